"""The one-shot terminal mode, run as a user would: `python app.py --model DIR --image F --prompt TEXT`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_app(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "app.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.parametrize("fixture", ["tiny_llava_dir", "tiny_360vl_dir"])
def test_one_shot_answers_on_stdout(request, fixture, image_file):
    model_dir = request.getfixturevalue(fixture)
    english = run_app("--model", model_dir, "--image", image_file, "--prompt", "What is in this picture?",
                      "--max-new-tokens", "12")
    assert english.returncode == 0, english.stderr
    assert english.stdout.strip() and english.stdout.endswith("\n")
    chinese = run_app("--model", model_dir, "--image", image_file, "--prompt", "图片里有什么？请用中文回答。",
                      "--max-new-tokens", "12", "--temperature", "0")
    assert chinese.returncode == 0 and chinese.stdout.strip()
    again = run_app("--model", model_dir, "--image", image_file, "--prompt", "图片里有什么？请用中文回答。",
                    "--max-new-tokens", "12", "--temperature", "0")
    assert again.stdout == chinese.stdout  # temperature 0 is greedy: the same answer every time
    assert "Traceback" not in english.stderr + chinese.stderr


def test_text_only_prompt_works(tiny_llava_dir):
    result = run_app("--model", tiny_llava_dir, "--prompt", "Say hello.", "--max-new-tokens", "5")
    assert result.returncode == 0 and result.stdout.strip()


def error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr  # one clear line, no traceback
    assert lines[0].startswith("error: ")
    return lines[0]


def test_missing_image(tiny_llava_dir, tmp_path):
    result = run_app("--model", tiny_llava_dir, "--image", str(tmp_path / "nope.jpg"), "--prompt", "hi")
    assert result.returncode == 1 and "does not exist" in error_line(result) and not result.stdout


def test_corrupt_image(tiny_llava_dir, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    result = run_app("--model", tiny_llava_dir, "--image", str(bad), "--prompt", "hi")
    assert result.returncode == 1 and "broken.jpg" in error_line(result)


def test_unknown_model_directory(tmp_path, image_file):
    result = run_app("--model", str(tmp_path / "no-such-model"), "--image", image_file, "--prompt", "hi")
    assert result.returncode == 1 and "does not exist" in error_line(result)


def test_model_not_on_the_hub_and_offline(image_file):
    result = run_app("--model", "nobody-here/not-a-model", "--prompt", "hi")
    line = error_line(result)
    assert result.returncode == 1 and "nobody-here/not-a-model" in line and "--model DIR" in line


def test_directory_that_is_not_a_model(tmp_path):
    result = run_app("--model", str(tmp_path), "--prompt", "hi")
    assert result.returncode == 1 and "config.json" in error_line(result)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    result = run_app("--model", str(tmp_path), "--prompt", "hi")
    assert result.returncode == 1 and "'bert' model" in error_line(result)


def test_no_gpu_when_cuda_is_asked_for(tiny_llava_dir):
    result = run_app("--model", tiny_llava_dir, "--device", "cuda", "--prompt", "hi")
    if result.returncode == 0:
        pytest.skip("this machine has a GPU")
    assert result.returncode == 1 and "--device cpu" in error_line(result)


@pytest.mark.parametrize("args,words", [
    (["--temperature", "-1", "--prompt", "x"], "temperature"),
    (["--max-new-tokens", "0", "--prompt", "x"], "max new tokens"),
    (["--temperature", "hot", "--prompt", "x"], "invalid float value"),
    (["--image", "x.png"], "--image needs --prompt"),
    (["--bogus"], "unrecognized arguments"),
    (["--port", "70000"], "--port"),
    (["--prompt", "  "], "--prompt is empty"),
    (["--auth", ":"], "--auth must look like USER:PASSWORD"),
    (["--max-image-mb", "nan"], "--max-image-mb"),
    (["--device", "gpu"], "invalid --device"),
    (["--dtype", "int8"], "invalid choice"),
    (["--max-context", "8"], "--max-context"),
])
def test_bad_flags_exit_2_with_one_line(args, words):
    result = run_app(*args, timeout=60)
    assert result.returncode == 2 and words in error_line(result)


def test_a_busy_port_is_reported_before_loading_the_model(tiny_llava_dir):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run_app("--model", tiny_llava_dir, "--port", str(taken.getsockname()[1]), timeout=60)
    assert result.returncode == 1 and "in use" in error_line(result)


def test_placeholder_and_special_tokens_in_a_question_are_plain_text(tiny_llava_dir):
    result = run_app("--model", tiny_llava_dir, "--prompt", "What does the <image> tag do? <|eot_id|>",
                     "--max-new-tokens", "4")
    assert result.returncode == 0 and result.stdout.strip(), result.stderr
