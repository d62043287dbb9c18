"""The generation engine: one thread owns the model; requests are queued, batched and streamed.

Life of a request:

1. `Engine.submit` (any thread) preprocesses the images on the caller's thread and queues the
   request; a full queue raises `EngineBusy` at once instead of hanging.
2. The inference thread admits waiting requests into free KV-cache slots. A slot still holding an
   earlier turn of the same conversation is reused: only the new tokens are prefilled. Image
   features come from a cache keyed by the image's content hash.
3. Prompts are prefilled in chunks (one chunk per loop iteration, so running streams keep flowing),
   then every admitted request decodes in one batched step per token (continuous batching).
4. New tokens go through an incremental detokenizer and out to the request's event queue as text.
   Cancelling a request (Stop, Regenerate, a closed tab) removes it before the next step.

No gradio here: the UI, the CLI and the benchmark all use this same API.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch

from vlui.engine.detokenize import make_detokenizer
from vlui.engine.runner import GraphedFunction, LlamaRunner, kv_bytes_per_token
from vlui.engine.sampling import SamplingParams, sample
from vlui.models.base import PreparedPrompt, VisionChatModel

log = logging.getLogger(__name__)


def available_ram() -> int:
    """Bytes of memory available to allocate (Linux's MemAvailable; elsewhere a conservative 8 GiB)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


class EngineBusy(RuntimeError):
    """The waiting queue is full. `str(err)` is a sentence for the user."""


class EngineError(RuntimeError):
    """The engine cannot take requests (not started, shut down, or broken)."""


@dataclass
class StreamEvent:
    kind: str  # "queued", "text", "done" or "error"
    text: str = ""  # the new text for "text"; a sentence for the user for "error"
    position: int = 0  # 1-based place in the waiting queue, for "queued"
    finish_reason: str | None = None  # "stop", "length", "context" or "cancelled", for "done"
    stats: dict | None = None


@dataclass
class EngineConfig:
    max_batch: int = 32  # KV-cache slots = requests decoding at once (fewer if memory is short)
    max_seq_len: int | None = None  # tokens per slot; default: the model's context length
    max_queue: int = 64  # requests waiting for a slot before `submit` says busy
    kv_memory_fraction: float = 0.85  # of the GPU memory free after loading, for the KV cache
    prefill_chunk: int = 1024  # prompt tokens per loop iteration
    image_cache_size: int = 32  # images whose features stay on the device
    compile: bool | None = None  # torch.compile the layers; default: on CUDA
    cuda_graphs: bool | None = None  # capture decode steps as CUDA graphs; default: on CUDA


class RequestHandle:
    """What `submit` returns: iterate it for StreamEvents; `cancel()` stops it within one step."""

    def __init__(self, engine: "Engine", request_id: int):
        self.id = request_id
        self._engine = engine
        self._events: queue.Queue[StreamEvent] = queue.Queue()
        self.cancelled = threading.Event()
        self.finished = threading.Event()
        self.text = ""

    def cancel(self) -> None:
        if not self.finished.is_set():
            self.cancelled.set()
            self._engine._wake()

    def __iter__(self):
        while True:
            event = self._events.get()
            if event.kind == "text":
                self.text += event.text
            yield event
            if event.kind in ("done", "error"):
                return

    def result(self) -> str:
        """Block until the end; return the whole answer (raises EngineError on an error event)."""
        for event in self:
            if event.kind == "error":
                raise EngineError(event.text)
        return self.text


@dataclass
class _Request:
    handle: RequestHandle
    prompt: PreparedPrompt
    params: SamplingParams
    conversation_id: str | None
    stop_ids: frozenset
    pixels: list[torch.Tensor | None]
    detok: object  # IncrementalDetokenizer or ByteDetokenizer
    submitted: float = field(default_factory=time.perf_counter)
    preprocess_s: float = 0.0
    slot: int = -1
    embeds: torch.Tensor | None = None  # prompt embeddings still to prefill, from position `filled`
    filled: int = 0  # positions of this slot whose KV is written
    reused: int = 0
    generated: list[int] = field(default_factory=list)
    reported_position: int = 0
    first_token_at: float | None = None
    started_at: float | None = None


@dataclass
class _Step:
    """A launched decoding step whose sampled ids have not been read back yet."""

    batch: list
    ids: torch.Tensor


@dataclass
class _CachedSlot:
    conversation_id: str | None
    keys: list  # what each written position holds (token id or image key)
    last_used: float


def _common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Engine:
    def __init__(self, model: VisionChatModel, config: EngineConfig | None = None):
        self.model = model
        self.config = config or EngineConfig()
        self.stop_ids = frozenset(model.stop_token_ids)
        self._lock = threading.Condition()
        self._pending: deque[_Request] = deque()
        self._prefilling: deque[_Request] = deque()
        self._decoding: list[_Request] = []
        self._free_slots: list[int] = []
        self._cached: dict[int, _CachedSlot] = {}
        self._image_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.runner: LlamaRunner | None = None
        self._seen: torch.Tensor | None = None  # [slots, vocab] tokens seen, for repetition penalty
        self._inflight: _Step | None = None
        self._vision_graph: GraphedFunction | None = None
        self._params_cache: tuple | None = None
        self.counters = {"decode_steps": 0, "prefill_tokens": 0, "reused_tokens": 0, "image_cache_hits": 0}

    # -- set-up -------------------------------------------------------------------------------
    def start(self, progress=None) -> "Engine":
        """Allocate the KV cache, warm up (compile, CUDA graphs) and start the inference thread."""
        cfg, model = self.config, self.model
        progress = progress or (lambda *_: None)
        max_seq = min(cfg.max_seq_len or model.context_length, model.context_length)
        slots = self._slots_that_fit(max_seq)
        progress(0, 3, f"allocating the KV cache: {slots} conversations x {max_seq} tokens")
        self.runner = LlamaRunner(model.decoder, model.lm_head, num_slots=slots, max_seq_len=max_seq)
        self._free_slots = list(range(slots))
        vocab = model.lm_head.weight.shape[0]
        self._seen = torch.zeros(slots + 1, vocab, dtype=torch.bool, device=self.runner.lm_head.weight.device)
        # Quantized (bitsandbytes) layers keep their own kernels; those are not compiled or graph-captured.
        on_cuda = self.runner.device.type == "cuda" and all(f is not None for f in self.runner.fused)
        if cfg.compile if cfg.compile is not None else on_cuda:
            progress(1, 3, "compiling the decoder (once per start)")
            self.runner.compile()
            self._warm_up_prefill()
        if cfg.cuda_graphs if cfg.cuda_graphs is not None else on_cuda:
            sizes = [s for s in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128) if s < slots] + [slots]
            self.runner.capture_cuda_graphs(sizes, progress=lambda i, n, msg: progress(2, 3, f"{msg} ({i + 1}/{n})"))
            self._capture_vision()
        make_detokenizer(model.tokenizer)  # builds the token -> bytes table now, not on a first request
        self._thread = threading.Thread(target=self._loop, name="vlui-inference", daemon=True)
        self._thread.start()
        progress(3, 3, "ready")
        return self

    def _capture_vision(self) -> None:
        """One image's vision encoding as a CUDA graph: tens of ms of kernel launches become one."""
        from PIL import Image

        from vlui.images import LoadedImage

        if self.runner.multi_device:
            return
        blank = LoadedImage(Image.new("RGB", (64, 64)), digest="warm-up", name="warm-up")
        example = self.model.preprocess(blank)[None].to(self.runner.device)
        try:
            self._vision_graph = GraphedFunction(self.model.encode_images, example)
        except Exception:  # a model whose vision code cannot be captured still works, eagerly
            log.warning("vision encoder runs without a CUDA graph", exc_info=True)

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return (self._vision_graph or self.model.encode_images)(pixels)

    def _slots_that_fit(self, max_seq: int) -> int:
        cfg, decoder = self.config, self.model.decoder
        device = decoder.embed_tokens.weight.device
        per_token = kv_bytes_per_token(decoder.config, decoder.embed_tokens.weight.element_size())
        if device.type == "cuda":
            free, where = torch.cuda.mem_get_info(device)[0] * cfg.kv_memory_fraction, "GPU"
        else:  # the CPU: at most half of the memory still available
            free, where = available_ram() * 0.5, "free RAM"
        fit = int(free) // (per_token * max_seq) - 1  # one slot is scratch
        if fit < 1:
            raise EngineError(
                f"Not enough {where} for the KV cache of even one {max_seq}-token conversation "
                f"({per_token * max_seq / 2**30:.1f} GiB). Lower --max-context or use a smaller model."
            )
        return min(cfg.max_batch, fit)

    @torch.inference_mode()
    def _warm_up_prefill(self) -> None:
        """Compile prefill shapes now rather than on the first user's request."""
        hidden = self.model.decoder.config.hidden_size
        for length in (1, 17, 600):  # dynamic shapes: one compile covers the range
            length = min(length, self.runner.max_seq_len)
            dummy = torch.zeros(length, hidden, dtype=self.runner.dtype, device=self.runner.device)
            self.runner.prefill(self.runner.scratch_slot, dummy, 0)

    def shutdown(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    # -- requests -----------------------------------------------------------------------------
    def submit(
        self, prompt: PreparedPrompt, params: SamplingParams, conversation_id: str | None = None
    ) -> RequestHandle:
        """Queue a request. Raises EngineBusy when the queue is full, ValueError on bad settings."""
        params.validate()
        if self._thread is None or self._stopping:
            raise EngineError("The model is not running; restart the app.")
        if len(prompt) >= self.runner.max_seq_len:
            raise ValueError(f"The prompt has {len(prompt)} tokens; the limit is {self.runner.max_seq_len - 1}.")
        # Preprocessing is CPU work: do it here, on the caller's thread, not on the GPU thread.
        started = time.perf_counter()
        pixels = [None if img.digest in self._image_cache else self.model.preprocess(img) for img in prompt.images]
        preprocess_s = time.perf_counter() - started
        handle = RequestHandle(self, next(self._ids))
        req = _Request(
            handle=handle,
            prompt=prompt,
            params=params,
            conversation_id=conversation_id,
            stop_ids=frozenset() if params.ignore_eos else self.stop_ids,
            pixels=pixels,
            detok=make_detokenizer(self.model.tokenizer),
            submitted=started,
            preprocess_s=preprocess_s,
        )
        with self._lock:
            if len(self._pending) >= self.config.max_queue:
                waiting = len(self._pending)
                raise EngineBusy(
                    f"The server is busy: {waiting} request{'s are' if waiting != 1 else ' is'} already waiting. "
                    "Please try again in a minute."
                )
            self._pending.append(req)
            self._lock.notify_all()
        return handle

    def stats(self) -> dict:
        with self._lock:
            return {
                "waiting": len(self._pending),
                "prefilling": len(self._prefilling),
                "decoding": len(self._decoding),
                "free_slots": len(self._free_slots),
                "cached_slots": len(self._cached),
                "slots": self.runner.num_slots if self.runner else 0,
                "images_cached": len(self._image_cache),
                **self.counters,
            }

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    # -- the inference thread -----------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._lock:
                while not self._stopping and not (self._pending or self._prefilling or self._decoding or self._inflight):
                    self._lock.wait(timeout=1.0)
                if self._stopping:
                    break
            self._reap_cancelled()
            self._admit()
            try:
                self._decode_step()
            except Exception as exc:  # a failed batch fails its requests, not the engine
                log.exception("decode step failed")
                self._inflight = None
                for req in list(self._decoding):
                    self._fail(req, exc)
            self._prefill_step()
        for req in [*self._pending, *self._prefilling, *self._decoding]:
            req.handle._events.put(StreamEvent("error", text="The server is shutting down."))
            req.handle.finished.set()

    def _reap_cancelled(self) -> None:
        with self._lock:
            waiting = [r for r in self._pending if r.handle.cancelled.is_set()]
            for req in waiting:
                self._pending.remove(req)
        for req in waiting:
            self._finish(req, "cancelled")
        for req in [r for r in (*self._prefilling, *self._decoding) if r.handle.cancelled.is_set()]:
            self._finish(req, "cancelled")

    def _take_slot(self, req: _Request) -> bool:
        """Give `req` a slot: its conversation's cached slot, a free one, or the least recently used cache."""
        same = [s for s, c in self._cached.items() if req.conversation_id and c.conversation_id == req.conversation_id]
        if same:
            slot = same[0]
            keys = req.prompt.cache_keys()
            # Keep at least one token to prefill: its logits give the first new token.
            req.reused = min(_common_prefix(self._cached.pop(slot).keys, keys), len(keys) - 1)
        elif self._free_slots:
            slot = self._free_slots.pop()
        elif self._cached:
            slot = min(self._cached, key=lambda s: self._cached[s].last_used)
            del self._cached[slot]
        else:
            return False
        req.slot = slot
        req.filled = req.reused
        return True

    def _admit(self) -> None:
        # While answers are streaming, take in one new request per step: preparing one (vision
        # encoding) is a pause for every running stream, and several at once would add up.
        budget = 1 if self._decoding else self.config.max_batch
        while budget > 0:
            budget -= 1
            with self._lock:
                if not self._pending:
                    break
                req = self._pending[0]
                if not self._take_slot(req):
                    break
                self._pending.popleft()
            try:
                self._prepare(req)
                self._prefilling.append(req)
            except Exception as exc:
                log.exception("preparing request %d failed", req.handle.id)
                self._fail(req, exc)
        with self._lock:
            for position, req in enumerate(self._pending, start=1):
                if req.reported_position != position:
                    req.reported_position = position
                    req.handle._events.put(StreamEvent("queued", position=position))

    @torch.inference_mode()
    def _prepare(self, req: _Request) -> None:
        """Embeddings of the positions still to prefill, with image features spliced in."""
        req.started_at = time.perf_counter()
        model, runner = self.model, self.runner
        ids = torch.tensor(req.prompt.token_ids[req.filled :], dtype=torch.long, device=runner.device)
        embeds = model.decoder.embed_tokens(ids)
        for (start, length), image, pixels in zip(req.prompt.image_spans, req.prompt.images, req.pixels):
            if start + length <= req.filled:
                continue  # this image is inside the reused cache: no need to look at it again
            features = self._image_features(image.digest, pixels, image)
            lo = max(start, req.filled)
            embeds[lo - req.filled : start + length - req.filled] = features[lo - start :].to(embeds.dtype)
        req.embeds = embeds
        self.counters["reused_tokens"] += req.reused
        seen = self._seen[req.slot]
        seen.zero_()
        text_ids = set(req.prompt.token_ids) - {model.image_token_id}
        if text_ids:
            seen[torch.tensor(sorted(text_ids), device=seen.device)] = True

    def _image_features(self, digest: str, pixels, image) -> torch.Tensor:
        features = self._image_cache.get(digest)
        if features is not None:
            self._image_cache.move_to_end(digest)
            self.counters["image_cache_hits"] += 1
            return features
        if pixels is None:  # evicted between submit and now
            pixels = self.model.preprocess(image)
        features = self._encode(pixels[None].to(self.runner.device))[0]
        self._image_cache[digest] = features
        while len(self._image_cache) > self.config.image_cache_size:
            self._image_cache.popitem(last=False)
        return features

    def _prefill_step(self) -> None:
        if not self._prefilling:
            return
        req = self._prefilling[0]
        try:
            done = req.filled - req.reused
            chunk = req.embeds[done : done + self.config.prefill_chunk]
            logits = self.runner.prefill(req.slot, chunk, req.filled)
            req.filled += chunk.shape[0]
            self.counters["prefill_tokens"] += chunk.shape[0]
            if req.filled < len(req.prompt):
                return
            self._prefilling.popleft()
            req.embeds = None
            token = self._sample([req], logits[None]).item()
            req.first_token_at = time.perf_counter()
            self._decoding.append(req)
            self._accept(req, token)
        except Exception as exc:
            log.exception("prefill of request %d failed", req.handle.id)
            self._fail(req, exc)

    def _decode_step(self) -> None:
        """One decoding step for every decoding request, overlapped with streaming the previous one.

        While the batch stays the same, step t+1 is launched with the ids sampled at step t still on
        the GPU, and only then are step t's ids read back and streamed: the GPU never waits for
        Python. A request that finished at step t has its row of step t+1 discarded.
        """
        previous, self._inflight = self._inflight, None
        batch = list(self._decoding)
        steady = previous is not None and previous.batch == batch
        if steady and all(r.filled < self.runner.max_seq_len for r in batch):
            self._inflight = self._launch(batch, previous.ids)
            self._consume(previous)
            return
        if previous is not None:
            self._consume(previous)
            batch = list(self._decoding)
        if batch:
            self._inflight = self._launch(batch, [r.generated[-1] for r in batch])

    def _launch(self, batch: list[_Request], tokens) -> _Step:
        positions = [r.filled for r in batch]
        logits = self.runner.decode([r.slot for r in batch], tokens, positions)
        for r in batch:
            r.filled += 1  # the input token's KV is written now
        self.counters["decode_steps"] += 1
        return _Step(batch, self._sample(batch, logits))

    def _consume(self, step: _Step) -> None:
        for req, token in zip(step.batch, step.ids.tolist()):
            if not req.handle.finished.is_set():
                self._accept(req, token)

    def _batch_params(self, batch: list[_Request], device) -> tuple:
        """Per-row sampling tensors, rebuilt only when the batch changes."""
        key = tuple(r.handle.id for r in batch)
        if self._params_cache is None or self._params_cache[0] != key:
            params = [r.params for r in batch]
            as_tensor = lambda xs, dt=torch.float32: torch.tensor(xs, dtype=dt, device=device)  # noqa: E731
            penalised = any(p.repetition_penalty != 1.0 for p in params)
            self._params_cache = (key, (
                as_tensor([p.temperature for p in params]),
                as_tensor([p.top_p for p in params]),
                as_tensor([p.repetition_penalty for p in params]) if penalised else None,
                as_tensor([r.slot for r in batch], torch.long).to(self._seen.device),
                any(p.top_p < 1.0 and not p.greedy for p in params),
                all(p.greedy for p in params) and not penalised,
            ))
        return self._params_cache[1]

    def _sample(self, batch: list[_Request], logits: torch.Tensor) -> torch.Tensor:
        """Token ids [B], left on the device. With a repetition penalty in the batch, the ids are also
        marked seen, on the device (rows without one never read their seen set; admission resets it)."""
        temperature, top_p, penalty, slots, use_top_p, all_greedy = self._batch_params(batch, logits.device)
        if all_greedy:
            return logits.argmax(dim=-1)
        seen = self._seen[slots].to(logits.device) if penalty is not None else None
        ids = sample(logits, temperature, top_p, penalty, seen, use_top_p=use_top_p)
        if penalty is not None:
            self._seen[slots, ids.to(self._seen.device)] = True
        return ids

    def _accept(self, req: _Request, token: int) -> None:
        """A new token for `req`: stream it, or finish the request."""
        if token in req.stop_ids:
            self._finish(req, "stop")
            return
        req.generated.append(token)
        delta = req.detok.push(token)
        if delta:
            req.handle._events.put(StreamEvent("text", text=delta))
        if len(req.generated) >= req.params.max_new_tokens:
            self._finish(req, "length")
        elif len(req.prompt) + len(req.generated) > self.runner.max_seq_len:  # no position left for this token
            self._finish(req, "context")

    def _remove(self, req: _Request) -> None:
        if req in self._decoding:
            self._decoding.remove(req)
        if req in self._prefilling:
            self._prefilling.remove(req)
        req.embeds = None

    def _finish(self, req: _Request, reason: str) -> None:
        self._remove(req)
        tail = req.detok.flush()
        if tail:
            req.handle._events.put(StreamEvent("text", text=tail))
        if req.slot >= 0:
            # Keep what this slot holds for the conversation's next turn (or a Regenerate).
            keys = (req.prompt.cache_keys() + req.generated)[: req.filled]
            self._cached[req.slot] = _CachedSlot(req.conversation_id, keys, time.perf_counter())
        req.handle._events.put(StreamEvent("done", finish_reason=reason, stats=self._request_stats(req)))
        req.handle.finished.set()

    def _fail(self, req: _Request, exc: Exception) -> None:
        self._remove(req)
        if req.slot >= 0:
            self._cached.pop(req.slot, None)
            self._free_slots.append(req.slot)
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            message = "The GPU ran out of memory for this request. Try a shorter message or fewer new tokens."
        else:
            message = f"Generation failed: {type(exc).__name__}: {exc}"
        req.handle._events.put(StreamEvent("error", text=message))
        req.handle.finished.set()

    def _request_stats(self, req: _Request) -> dict:
        now = time.perf_counter()
        decode_time = now - req.first_token_at if req.first_token_at else 0.0
        return {
            "prompt_tokens": len(req.prompt),
            "reused_tokens": req.reused,
            "new_tokens": len(req.generated),
            "preprocess_s": round(req.preprocess_s, 4),
            "queue_s": round((req.started_at or now) - req.submitted, 4),
            "first_token_s": round(req.first_token_at - req.submitted, 4) if req.first_token_at else None,
            "tokens_per_s": round((len(req.generated) - 1) / decode_time, 2) if decode_time > 0 and len(req.generated) > 1 else None,
        }
