"""Benchmark: the vlui engine against plain transformers `generate`, measured in the same run.

    python -m vlui.bench --family llava --size 8b --device cuda          # full-size random weights
    python -m vlui.bench --family 360vl --size tiny --device cpu         # runs anywhere

It builds a random-weight model from the real config (no download), measures the hardware ceilings
(device-to-device copy bandwidth, bf16 matmul FLOP/s), then:

* baseline: `generate` with a TextIteratorStreamer, one user; then N users, one thread each (what
  demos built on the model cards do);
* vlui: the engine's warm-up, one user, then N concurrent streams with different prompts and lengths
  joining at random times, then an overload of more users than KV-cache slots.

It prints a table, and as its last line one JSON object with every figure, the roofline numbers and
the ratios. Decode rooflines: bytes of language-model weights read per step (plus the KV cache read
at the batch's lengths) over the measured copy bandwidth. Time-to-first-token floor: FLOPs of the
prefill (vision tower, projector, language model; counted by torch's FlopCounterMode) over the
measured matmul rate.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
import time

import torch
from PIL import Image

from vlui.engine.engine import Engine, EngineConfig
from vlui.engine.sampling import SamplingParams
from vlui.images import LoadedImage
from vlui.models.base import Message

QUESTIONS = [
    "Describe this image in detail, including the colours, the objects and their positions.",  # ~20 tokens
    "What is in the picture?",
    "请详细描述这张图片的内容，包括颜色、物体和它们的位置。",
    "Write a short poem about this scene, then explain which details of the image inspired each line of it. "
    "Be specific about shapes and colours, and mention anything that looks unusual or surprising.",
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_copy_bandwidth(device: torch.device) -> float:
    """Bytes per second moved by a device-to-device copy, counting bytes read and written."""
    n = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    reps = 20 if device.type == "cuda" else 5
    start = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    sync(device)
    return 2 * n * reps / (time.perf_counter() - start)


def measure_matmul_flops(device: torch.device, dtype: torch.dtype) -> float:
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 10 if device.type == "cuda" else 3
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def weight_bytes_per_token(model) -> int:
    """Language-model weights read per decoding step (the embedding table is only indexed)."""
    params = [*model.decoder.layers.parameters(), *model.decoder.norm.parameters(), *model.lm_head.parameters()]
    return sum(p.numel() * p.element_size() for p in params)


def test_image(seed: int) -> LoadedImage:
    rng = random.Random(seed)
    img = Image.new("RGB", (800, 600), tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(12):
        x, y = rng.randrange(700), rng.randrange(500)
        img.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, x + 100, y + 100))
    return LoadedImage(img, digest=f"bench-{seed}", name=f"bench-{seed}.png")


def build_prompt(model, question: str, image: LoadedImage | None):
    return model.tokenize([Message("user", question, image)], model.default_system_prompt)


@torch.inference_mode()
def prefill_flops(model, prompt) -> int:
    """FLOPs of vision encoding + language-model prefill of `prompt`, counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    pixels = torch.stack([model.preprocess(img) for img in prompt.images]) if prompt.images else None
    ids = torch.tensor(prompt.token_ids, device=model.device)
    # Count attention as plain matmuls: the FLOP counter cannot read grouped-query SDPA calls.
    config = model.decoder.config
    saved, config._attn_implementation = config._attn_implementation, "eager"
    try:
        return _count_prefill(model, prompt, pixels, ids, FlopCounterMode)
    finally:
        config._attn_implementation = saved


def _count_prefill(model, prompt, pixels, ids, FlopCounterMode) -> int:
    with FlopCounterMode(display=False) as counter:
        embeds = model.decoder.embed_tokens(ids)
        if pixels is not None:
            features = model.encode_images(pixels)
            (start, length) = prompt.image_spans[0]
            embeds[start : start + length] = features[0].to(embeds.dtype)
        hidden = model.decoder(inputs_embeds=embeds[None]).last_hidden_state
        model.lm_head(hidden[:, -1])
    return counter.get_total_flops()


# -- baseline: plain generate ---------------------------------------------------------------------
def baseline_stream(model, prompt, new_tokens: int) -> dict:
    """One `generate` call with a TextIteratorStreamer, timing each token as the streamer receives it."""
    from transformers import TextIteratorStreamer

    times: list[float] = []

    class TimedStreamer(TextIteratorStreamer):
        def put(self, value):
            if self.next_tokens_are_prompt:
                return super().put(value)
            times.append(time.perf_counter())
            return super().put(value)

    streamer = TimedStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True)
    device = model.device
    start = time.perf_counter()
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=streamer,
                  pad_token_id=model.stop_token_ids[0])
    with torch.inference_mode():
        ids = torch.tensor([prompt.token_ids], device=device)
        if model.family == "llava-hf":
            pixels = model.normalize(torch.stack([model.preprocess(i) for i in prompt.images]), device, model.dtype) if prompt.images else None
            run = lambda: model.hf_model.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids), **kwargs)  # noqa: E731
        else:  # 360VL: the official code splices image features into inputs_embeds, then calls generate
            def run():
                embeds = model.decoder.embed_tokens(ids[0])
                if prompt.images:
                    features = model.encode_images(torch.stack([model.preprocess(i) for i in prompt.images]))
                    s, n = prompt.image_spans[0]
                    embeds[s : s + n] = features[0].to(embeds.dtype)
                return model.hf_model.generate(inputs_embeds=embeds[None], attention_mask=torch.ones_like(ids), **kwargs)
        worker = threading.Thread(target=lambda: torch.inference_mode()(run)())
        worker.start()
        for _ in streamer:
            pass
        worker.join()
    end = time.perf_counter()
    return stream_figures(start, times, end)


def stream_figures(start: float, times: list[float], end: float) -> dict:
    first = times[0] - start if times else None
    gaps = [b - a for a, b in zip(times, times[1:])]
    decode_s = times[-1] - times[0] if len(times) > 1 else 0.0
    return {
        "tokens": len(times),
        "first_token_s": first,
        "decode_tok_s": (len(times) - 1) / decode_s if decode_s > 0 else None,
        "worst_gap_s": max(gaps) if gaps else None,
        "wall_s": end - start,
        "_times": times,
    }


def steady_state_tok_s(results: list[dict]) -> float | None:
    """Tokens per second while every stream was running: from the last stream's first token to the
    first stream's last token (users join and leave at random, so this is the fully batched window)."""
    streams = [r["_times"] for r in results if len(r["_times"]) > 1]
    if not streams:
        return None
    lo, hi = max(t[0] for t in streams), min(t[-1] for t in streams)
    if hi - lo < 0.2:
        return None
    return sum(1 for t in streams for x in t if lo <= x <= hi) / (hi - lo)


def run_concurrent(fn, users: int, stagger_s: float, seed: int) -> tuple[list[dict], float]:
    """Run fn(user_index) in `users` threads, each starting after a random delay; returns results, wall time."""
    rng = random.Random(seed)
    delays = [0.0] + [rng.uniform(0, stagger_s) for _ in range(users - 1)]
    results: list[dict | None] = [None] * users

    def worker(i: int) -> None:
        time.sleep(delays[i])
        results[i] = fn(i)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start


def summarize_users(results: list[dict], wall: float) -> dict:
    tokens = sum(r["tokens"] for r in results)
    rates = [r["decode_tok_s"] for r in results if r["decode_tok_s"]]
    return {
        "users": len(results),
        "total_tokens": tokens,
        "aggregate_tok_s": tokens / wall,
        "slowest_stream_tok_s": min(rates) if rates else None,
        "worst_first_token_s": max(r["first_token_s"] for r in results if r["first_token_s"] is not None),
        "worst_gap_s": max((r["worst_gap_s"] or 0.0) for r in results),
        "steady_tok_s": steady_state_tok_s(results),
        "wall_s": wall,
    }


# -- vlui engine ----------------------------------------------------------------------------------
def engine_stream(engine: Engine, prompt, params: SamplingParams) -> dict:
    """Submit and consume one request, timing every text event."""
    start = time.perf_counter()
    times: list[float] = []
    done = None
    for event in engine.submit(prompt, params):
        if event.kind == "text":
            times.append(time.perf_counter())
        elif event.kind == "error":
            raise RuntimeError(event.text)
        elif event.kind == "done":
            done = event
    end = time.perf_counter()
    figures = stream_figures(start, times, end)
    stats = done.stats
    figures["tokens"] = stats["new_tokens"]  # text events can merge tokens (a held-back partial character)
    figures["first_token_s"] = stats["first_token_s"]
    figures["preprocess_s"] = stats["preprocess_s"]  # CPU resizing (PIL), inside first_token_s
    figures["decode_tok_s"] = stats["tokens_per_s"]
    figures["max_queue_position"] = 0
    return figures


@torch.inference_mode()
def first_token_breakdown(engine: Engine, model, prompt) -> dict:
    """Where the time to first token goes, each stage timed alone (synchronized), plus the speed of
    the decode step by itself (CUDA-graph replays with no sampling or streaming)."""
    device = engine.runner.device
    timings = {}
    pixels = torch.stack([model.preprocess(img) for img in prompt.images])  # warm (first-call costs)
    start = time.perf_counter()
    pixels = torch.stack([model.preprocess(img) for img in prompt.images])
    timings["preprocess_s"] = time.perf_counter() - start
    pixels = pixels.to(device)
    engine._encode(pixels)
    sync(device)
    start = time.perf_counter()
    features = engine._encode(pixels)
    sync(device)
    timings["vision_s"] = time.perf_counter() - start
    embeds = model.decoder.embed_tokens(torch.tensor(prompt.token_ids, device=device))
    s, n = prompt.image_spans[0]
    embeds[s : s + n] = features[0].to(embeds.dtype)
    engine.runner.prefill(engine.runner.scratch_slot, embeds, 0)  # warm
    sync(device)
    start = time.perf_counter()
    engine.runner.prefill(engine.runner.scratch_slot, embeds, 0)
    sync(device)
    timings["prefill_s"] = time.perf_counter() - start
    token = torch.zeros(1, dtype=torch.long, device=device)
    steps, pos = 64, len(prompt)
    engine.runner.decode([engine.runner.scratch_slot], token, [pos])
    sync(device)
    start = time.perf_counter()
    for i in range(steps):
        engine.runner.decode([engine.runner.scratch_slot], token, [pos + i])
    sync(device)
    timings["decode_step_only_tok_s"] = steps / (time.perf_counter() - start)
    return timings


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["llava", "360vl"], default="llava")
    parser.add_argument("--size", choices=["tiny", "8b"], default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--users", type=int, default=32, help="concurrent streams for the vlui engine")
    parser.add_argument("--baseline-users", type=int, default=8, help="concurrent threads for the baseline (0: skip)")
    parser.add_argument("--overload-users", type=int, default=72, help="simultaneous users beyond the KV budget")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-context", type=int, default=4096, help="tokens per KV-cache slot")
    parser.add_argument("--stagger", type=float, default=2.0, help="users join within this many seconds")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    from vlui import synthetic
    from vlui.models import load_model

    t0 = time.perf_counter()
    if args.size == "tiny":
        tmp = tempfile.mkdtemp(prefix="vlui-bench-")
        writer = synthetic.write_tiny_llava if args.family == "llava" else synthetic.write_tiny_360vl
        model = load_model(str(writer(tmp, seed=args.seed)), device=args.device, dtype=str(dtype).removeprefix("torch."))
    else:
        model = synthetic.random_model(args.family, args.size, device=args.device, dtype=dtype, seed=args.seed)
    build_s = time.perf_counter() - t0

    out: dict = {"model": model.name, "family": model.family, "device": str(device), "dtype": str(dtype),
                 "image_tokens": model.image_token_count, "build_s": build_s}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    out["copy_bandwidth_GBps"] = measure_copy_bandwidth(device) / 1e9
    out["matmul_TFLOPs"] = measure_matmul_flops(device, dtype) / 1e12
    wbytes = weight_bytes_per_token(model)
    out["weight_GB_per_token"] = wbytes / 1e9
    out["roofline_batch1_tok_s"] = out["copy_bandwidth_GBps"] * 1e9 / wbytes

    image = test_image(args.seed)
    prompt = build_prompt(model, QUESTIONS[0], image)
    out["prompt_tokens"] = len(prompt)
    flops = prefill_flops(model, prompt)
    out["prefill_TFLOP"] = flops / 1e12
    out["first_token_floor_s"] = flops / (out["matmul_TFLOPs"] * 1e12)
    new = args.new_tokens
    greedy = SamplingParams(max_new_tokens=new, ignore_eos=True)

    # Baseline first: it uses the model's own modules before the engine fuses any weights.
    if not args.skip_baseline:
        baseline_stream(model, prompt, 4)  # warm-up (cuBLAS handles, allocator)
        out["baseline_single"] = baseline_stream(model, prompt, new)
        if args.baseline_users > 0:
            def one_baseline(i):
                q = QUESTIONS[i % len(QUESTIONS)]
                return baseline_stream(model, build_prompt(model, q, test_image(args.seed + i)), new // 2)
            results, wall = run_concurrent(one_baseline, args.baseline_users, args.stagger, args.seed)
            out["baseline_multi"] = summarize_users(results, wall)

    warm_start = time.perf_counter()
    steps: list[str] = []
    engine = Engine(model, EngineConfig(max_batch=args.max_batch, max_seq_len=args.max_context,
                                        max_queue=max(64, args.overload_users)))
    engine.start(progress=lambda i, n, msg: steps.append(msg))
    out["engine_warmup_s"] = time.perf_counter() - warm_start
    out["engine_slots"] = engine.runner.num_slots
    engine_stream(engine, prompt, SamplingParams(max_new_tokens=4, ignore_eos=True))  # first request
    # The same image again is served from the feature cache; a new image shows the full cost.
    out["vlui_single"] = engine_stream(engine, build_prompt(model, QUESTIONS[0], test_image(args.seed + 1000)), greedy)

    out["vlui_breakdown"] = first_token_breakdown(engine, model, build_prompt(model, QUESTIONS[0], test_image(args.seed + 2000)))

    rng = random.Random(args.seed)

    # Different questions, every fourth user without an image, half of them sampling, lengths N/2..N.
    user_prompts = [build_prompt(model, QUESTIONS[i % 4], test_image(args.seed + i) if i % 4 != 3 else None)
                    for i in range(args.users)]
    user_tokens = [rng.randint(new // 2, new) for _ in range(args.users)]

    def one_user(i: int) -> dict:
        params = SamplingParams(max_new_tokens=user_tokens[i], ignore_eos=True,
                                temperature=0.7 if i % 2 else 0.0, top_p=0.9)
        return engine_stream(engine, user_prompts[i], params)

    results, wall = run_concurrent(one_user, args.users, args.stagger, args.seed)
    out["vlui_multi"] = summarize_users(results, wall)
    # KV read per step at the streams' mean length while decoding (prompt + half of the answer).
    contexts = [len(p) + t / 2 for p, t in zip(user_prompts, user_tokens)]
    batch = min(args.users, engine.runner.num_slots)
    kv_read = engine.runner.kv_bytes_per_token * statistics.mean(contexts) * batch
    out["roofline_batched_tok_s"] = batch * out["copy_bandwidth_GBps"] * 1e9 / (wbytes + kv_read)

    # Overload: more users at once than KV slots; the rest wait in the queue and see their position.
    positions: list[int] = []

    def overloaded(i: int) -> dict:
        handle = engine.submit(build_prompt(model, QUESTIONS[i % 4], None), SamplingParams(max_new_tokens=16, ignore_eos=True))
        finished = None
        for event in handle:
            if event.kind == "queued":
                positions.append(event.position)
            elif event.kind in ("done", "error"):
                finished = event
        return {"ok": finished.kind == "done"}

    results, wall = run_concurrent(overloaded, args.overload_users, 0.0, args.seed)
    out["overload"] = {"users": args.overload_users, "completed": sum(r["ok"] for r in results),
                       "max_queue_position": max(positions, default=0), "wall_s": wall}
    engine.shutdown()

    single = out["vlui_single"]
    out["ratios"] = {
        "vlui_batch1_vs_roofline": (single["decode_tok_s"] or 0) / out["roofline_batch1_tok_s"],
        "vlui_first_token_vs_floor": single["first_token_s"] / out["first_token_floor_s"],
        "vlui_first_token_after_cpu_preprocessing_vs_floor":
            (single["first_token_s"] - single["preprocess_s"]) / out["first_token_floor_s"],
        "vlui_multi_vs_batched_roofline": out["vlui_multi"]["aggregate_tok_s"] / out["roofline_batched_tok_s"],
        "vlui_steady_vs_batched_roofline": (out["vlui_multi"]["steady_tok_s"] or 0) / out["roofline_batched_tok_s"],
    }
    if "baseline_single" in out:
        base = out["baseline_single"]
        out["ratios"]["vlui_vs_baseline_decode"] = (single["decode_tok_s"] or 0) / (base["decode_tok_s"] or 1)
    for key in ("baseline_single", "vlui_single"):
        out.get(key, {}).pop("_times", None)
    print_table(out)
    print(json.dumps(out, default=float))
    return out


def print_table(out: dict) -> None:
    def fmt(v, unit=""):
        return "-" if v is None else (f"{v:,.3f}{unit}" if isinstance(v, float) else f"{v}{unit}")

    print(f"\n{out['model']} on {out.get('gpu', out['device'])} ({out['dtype']}), {out['prompt_tokens']} prompt tokens "
          f"incl. {out['image_tokens']} image tokens")
    print(f"copy bandwidth {out['copy_bandwidth_GBps']:,.0f} GB/s, matmul {out['matmul_TFLOPs']:,.1f} TFLOP/s, "
          f"weights {out['weight_GB_per_token']:.2f} GB/token")
    print(f"{'figure':<44}{'baseline':>14}{'vlui':>14}{'limit':>14}")
    rows = [
        ("batch-1 decode tok/s", out.get("baseline_single", {}).get("decode_tok_s"), out["vlui_single"]["decode_tok_s"], out["roofline_batch1_tok_s"]),
        ("time to first token s", out.get("baseline_single", {}).get("first_token_s"), out["vlui_single"]["first_token_s"], out["first_token_floor_s"]),
        ("multi-user aggregate tok/s", out.get("baseline_multi", {}).get("aggregate_tok_s"), out["vlui_multi"]["aggregate_tok_s"], out["roofline_batched_tok_s"]),
        ("multi-user slowest stream tok/s", out.get("baseline_multi", {}).get("slowest_stream_tok_s"), out["vlui_multi"]["slowest_stream_tok_s"], None),
        ("multi-user worst first token s", out.get("baseline_multi", {}).get("worst_first_token_s"), out["vlui_multi"]["worst_first_token_s"], None),
        ("multi-user worst gap s", out.get("baseline_multi", {}).get("worst_gap_s"), out["vlui_multi"]["worst_gap_s"], None),
        ("multi-user steady-state tok/s (all streaming)", out.get("baseline_multi", {}).get("steady_tok_s"), out["vlui_multi"]["steady_tok_s"], out["roofline_batched_tok_s"]),
    ]
    for name, base, ours, limit in rows:
        print(f"{name:<44}{fmt(base):>14}{fmt(ours):>14}{fmt(limit):>14}")
    users = (out.get("baseline_multi", {}).get("users"), out["vlui_multi"]["users"])
    print(f"(multi-user: baseline {users[0]} threads, vlui {users[1]} streams; engine warm-up {out['engine_warmup_s']:.1f} s)")
    b = out["vlui_breakdown"]
    print(f"vlui first token: preprocess {b['preprocess_s'] * 1e3:.1f} ms, vision {b['vision_s'] * 1e3:.1f} ms, "
          f"prefill {b['prefill_s'] * 1e3:.1f} ms; decode step alone {b['decode_step_only_tok_s']:.1f} tok/s")
    o = out["overload"]
    print(f"overload: {o['completed']}/{o['users']} completed, max queue position {o['max_queue_position']}")
    print("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in out["ratios"].items()))


if __name__ == "__main__":
    main()
