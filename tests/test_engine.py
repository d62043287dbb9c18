"""The engine on the tiny LLaVA checkpoint: streaming, continuous batching, cancellation, queueing,
per-request settings, KV-cache reuse across turns."""

from __future__ import annotations

import threading
import time

import pytest

from vlui.engine.engine import Engine, EngineBusy, EngineConfig
from vlui.engine.sampling import SamplingParams
from vlui.models.base import Message

GREEDY = SamplingParams(max_new_tokens=12)


@pytest.fixture
def engine(llava_model):
    e = Engine(llava_model, EngineConfig(max_batch=4, max_queue=8)).start()
    yield e
    e.shutdown()


def prompt(model, text, image=None, history=()):
    return model.tokenize([*history, Message("user", text, image)])


def run(engine, p, params=GREEDY, conversation_id=None):
    handle = engine.submit(p, params, conversation_id)
    events = list(handle)
    return handle, events


def test_stream_text_then_done(engine, llava_model, red_image):
    handle, events = run(engine, prompt(llava_model, "What is this?", red_image))
    kinds = [e.kind for e in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) <= {"text"} and "text" in kinds
    done = events[-1]
    assert done.finish_reason == "length" and done.stats["new_tokens"] == 12
    assert "".join(e.text for e in events if e.kind == "text") == handle.text
    assert done.stats["prompt_tokens"] == len(prompt(llava_model, "What is this?", red_image))


def test_batched_greedy_equals_unbatched(llava_model, red_image):
    prompts = [
        prompt(llava_model, "What is this?", red_image),
        prompt(llava_model, "Tell me a long story about a dragon who learned to paint."),
        prompt(llava_model, "这张图片里有什么？", red_image),
        prompt(llava_model, "Hi"),
    ]
    params = SamplingParams(max_new_tokens=20)
    alone = Engine(llava_model, EngineConfig(max_batch=1)).start()
    try:
        expected = [alone.submit(p, params).result() for p in prompts]
    finally:
        alone.shutdown()
    together = Engine(llava_model, EngineConfig(max_batch=4)).start()
    try:
        handles = [together.submit(p, params) for p in prompts]
        got = [h.result() for h in handles]
        assert together.counters["decode_steps"] < 4 * 20  # the rows really shared steps
    finally:
        together.shutdown()
    assert got == expected


def test_cancel_one_request_mid_batch(engine, llava_model, red_image):
    long = SamplingParams(max_new_tokens=300)
    p_keep = prompt(llava_model, "Describe the image.", red_image)
    p_stop = prompt(llava_model, "Write an essay.")
    reference = Engine(llava_model, EngineConfig(max_batch=1)).start()
    try:
        expected = reference.submit(p_keep, long).result()
    finally:
        reference.shutdown()
    keep = engine.submit(p_keep, long)
    stop = engine.submit(p_stop, long)
    seen = 0
    for event in stop:
        if event.kind == "text":
            seen += 1
            if seen == 3:
                stop.cancel()
        if event.kind == "done":
            assert event.finish_reason == "cancelled"
            assert event.stats["new_tokens"] < 300
    assert keep.result() == expected  # the other stream is undisturbed
    deadline = time.time() + 5
    while engine.stats()["decoding"] and time.time() < deadline:
        time.sleep(0.01)
    stats = engine.stats()
    assert stats["decoding"] == 0 and stats["prefilling"] == 0 and stats["waiting"] == 0
    assert stats["free_slots"] + stats["cached_slots"] == stats["slots"]


def test_cancel_while_waiting_and_no_thread_leak(llava_model):
    before = threading.active_count()
    e = Engine(llava_model, EngineConfig(max_batch=1, max_queue=4)).start()
    first = e.submit(prompt(llava_model, "one"), SamplingParams(max_new_tokens=400))
    second = e.submit(prompt(llava_model, "two"), SamplingParams(max_new_tokens=5))
    second.cancel()
    events = list(second)
    assert events[-1].kind == "done" and events[-1].finish_reason == "cancelled"
    assert not second.text
    first.cancel()
    assert list(first)[-1].finish_reason == "cancelled"
    e.shutdown()
    assert threading.active_count() == before


def test_full_queue_answers_busy(llava_model):
    e = Engine(llava_model, EngineConfig(max_batch=1, max_queue=2)).start()
    try:
        handles = [e.submit(prompt(llava_model, "a"), SamplingParams(max_new_tokens=500))]
        time.sleep(0.2)  # let the engine take the first into its only slot
        handles += [e.submit(prompt(llava_model, q), SamplingParams(max_new_tokens=3)) for q in "bc"]
        with pytest.raises(EngineBusy, match="busy"):
            e.submit(prompt(llava_model, "d"), SamplingParams(max_new_tokens=3))
        third = iter(handles[2])
        first_event = next(third)
        assert (first_event.kind, first_event.position) == ("queued", 2)
        handles[0].cancel()
        positions = [ev.position for ev in third if ev.kind == "queued"]
        assert positions == [1]  # the waiting user sees its place move up
    finally:
        e.shutdown()


def test_sampling_settings_are_per_request(engine, llava_model, red_image):
    p = prompt(llava_model, "What is this?", red_image)
    greedy = engine.submit(p, SamplingParams(max_new_tokens=15)).result()
    # top-p so small that only the most likely token survives: the same as greedy, though sampled.
    nucleus = engine.submit(p, SamplingParams(max_new_tokens=15, temperature=1.0, top_p=1e-6)).result()
    short = list(engine.submit(p, SamplingParams(max_new_tokens=3)))
    assert nucleus == greedy
    assert short[-1].stats["new_tokens"] == 3
    # The random model repeats itself under greedy decoding; a repetition penalty must change that.
    penalised = engine.submit(p, SamplingParams(max_new_tokens=15, repetition_penalty=3.0)).result()
    assert penalised != greedy


def test_stop_token_ends_the_answer(llava_model, red_image):
    e = Engine(llava_model, EngineConfig(max_batch=2)).start()
    try:
        p = prompt(llava_model, "What is this?", red_image)
        first = list(e.submit(p, SamplingParams(max_new_tokens=1)))
        assert first[-1].stats["new_tokens"] == 1
        token = llava_model.tokenizer.encode(first[0].text, add_special_tokens=False)[0]
        e.stop_ids = frozenset({token})  # pretend the model's first choice is a stop token
        events = list(e.submit(p, SamplingParams(max_new_tokens=10)))
        assert events[-1].finish_reason == "stop" and events[-1].stats["new_tokens"] == 0
    finally:
        e.shutdown()


def test_next_turn_reuses_the_kv_cache(llava_model, red_image):
    params = SamplingParams(max_new_tokens=10)
    turn1 = [Message("user", "What is this?", red_image)]
    e = Engine(llava_model, EngineConfig(max_batch=2)).start()
    try:
        answer = e.submit(llava_model.tokenize(turn1), params, conversation_id="c1").result()
        turn2 = [*turn1, Message("assistant", answer), Message("user", "And the colour?")]
        p2 = llava_model.tokenize(turn2)
        events = list(e.submit(p2, params, conversation_id="c1"))
        reused = events[-1].stats["reused_tokens"]
        second = "".join(ev.text for ev in events if ev.kind == "text")
    finally:
        e.shutdown()
    assert reused >= len(llava_model.tokenize(turn1))  # at least the whole first prompt, image included
    fresh = Engine(llava_model, EngineConfig(max_batch=1)).start()
    try:
        assert fresh.submit(p2, params).result() == second  # reuse changes nothing but speed
    finally:
        fresh.shutdown()


def test_same_image_is_encoded_once(engine, llava_model, red_image):
    engine.submit(prompt(llava_model, "one", red_image), SamplingParams(max_new_tokens=2)).result()
    hits = engine.counters["image_cache_hits"]
    engine.submit(prompt(llava_model, "two", red_image), SamplingParams(max_new_tokens=2)).result()
    assert engine.counters["image_cache_hits"] == hits + 1


def test_answer_stops_at_the_context_window(llava_model):
    e = Engine(llava_model, EngineConfig(max_batch=1, max_seq_len=64)).start()
    try:
        p = prompt(llava_model, "Tell me everything.")
        events = list(e.submit(p, SamplingParams(max_new_tokens=500)))
        assert events[-1].finish_reason == "context"
        assert events[-1].stats["new_tokens"] == 64 - len(p) + 1
        with pytest.raises(ValueError, match="limit"):
            e.submit(prompt(llava_model, "x " * 80), SamplingParams(max_new_tokens=5))
    finally:
        e.shutdown()


def test_a_failing_request_does_not_stop_the_engine(engine, llava_model, red_image, monkeypatch):
    real = llava_model.encode_images

    def broken(pixels):
        raise RuntimeError("vision tower exploded")

    monkeypatch.setattr(llava_model, "encode_images", broken)
    events = list(engine.submit(prompt(llava_model, "What?", red_image), GREEDY))
    assert events[-1].kind == "error" and "vision tower exploded" in events[-1].text
    monkeypatch.setattr(llava_model, "encode_images", real)
    assert engine.submit(prompt(llava_model, "Still there?"), GREEDY).result()


def test_bad_settings_are_refused_with_a_sentence(engine, llava_model):
    for bad, word in [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top-p"),
                      (dict(max_new_tokens=0), "max new tokens"), (dict(repetition_penalty=9), "repetition")]:
        with pytest.raises(ValueError, match=word):
            engine.submit(prompt(llava_model, "x"), SamplingParams(**bad))
