"""End to end through the running app (`python app.py`) with gradio_client: streaming, Stop, several
users at once, hostile uploads, and the 360VL checkpoint answering in English and Chinese."""

from __future__ import annotations

import threading
import time

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from tests.conftest import RunningApp

SETTINGS = ("", 24, 0.0, 0.9, 1.0)  # system prompt, max new tokens, temperature, top-p, repetition penalty


def answer_text(history: list) -> str:
    last = history[-1]
    assert last["role"] == "assistant"
    return "".join(part.get("text", "") for part in last["content"] if part.get("type") == "text")


def chat(client: Client, text: str, image: str | None = None, settings=SETTINGS):
    message = {"text": text, "files": [handle_file(image)] if image else []}
    return client.submit(message, *settings, api_name="/chat")


def test_image_question_streams_token_by_token(llava_app):
    client = Client(llava_app.url, verbose=False)
    job = chat(client, "What is written on this note?", "assets/note.png")
    lengths = [len(answer_text(history)) for history, *_ in job if history and history[-1]["role"] == "assistant"]
    assert len(lengths) >= 5 and lengths == sorted(lengths) and lengths[-1] > lengths[0]
    history, _, status = job.result()
    assert history[0]["role"] == "user" and any(part.get("type") == "file" for part in history[0]["content"])
    assert "24 tokens" in status


def test_stop_ends_the_answer_and_the_app_keeps_serving(llava_app):
    client = Client(llava_app.url, verbose=False)
    job = chat(client, "Write a very long story.", settings=("", 3000, 0.0, 0.9, 1.0))
    seen = 0
    for _ in job:
        seen += 1
        if seen == 5:
            job.cancel()
            break
    started = time.time()
    while not job.done() and time.time() - started < 10:
        time.sleep(0.1)
    assert job.done()
    follow_up = chat(Client(llava_app.url, verbose=False), "Are you still there?")
    assert answer_text(follow_up.result()[0])  # a free slot: the cancelled request let go of the GPU


def test_two_users_at_once_both_get_their_own_answers(llava_app):
    prompts = [("Describe the shapes.", "assets/shapes.png"), ("这张纸上写了什么？", "assets/note.png")]
    alone = [answer_text(chat(Client(llava_app.url, verbose=False), q, img).result()[0]) for q, img in prompts]
    results: list = [None, None]

    def user(i):
        results[i] = answer_text(chat(Client(llava_app.url, verbose=False), *prompts[i]).result()[0])

    threads = [threading.Thread(target=user, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results == alone  # greedy answers are the same alone or batched together


def test_hostile_upload_gets_a_specific_message(llava_app, tmp_path):
    fake = tmp_path / "holiday.png"
    fake.write_bytes(b"GIF89a" + b"\x00" * 20)  # claims to be an image, is garbage
    client = Client(llava_app.url, verbose=False)
    with pytest.raises(AppError, match="holiday.png.*(damaged|not an image)"):
        chat(client, "What is this?", str(fake)).result()
    assert answer_text(chat(client, "Hello?").result()[0])  # nothing broke


def test_empty_message_is_refused(llava_app):
    with pytest.raises(AppError, match="Type a question or attach an image"):
        chat(Client(llava_app.url, verbose=False), "   ").result()


def test_360vl_answers_in_english_and_chinese(tiny_360vl_dir):
    app = RunningApp(tiny_360vl_dir, "--max-batch", "2")
    try:
        client = Client(app.url, verbose=False)
        english = chat(client, "What does the note say?", "assets/note.png").result()
        chinese = chat(client, "请用中文回答：纸上写了什么？").result()  # a follow-up in the same conversation
        assert answer_text(english[0]) and answer_text(chinese[0])
        assert len(chinese[0]) == 4  # both turns are in the conversation
        assert "tokens" in chinese[2]
    finally:
        app.stop()
