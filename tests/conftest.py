"""Shared fixtures: tiny random-weight checkpoints in the real on-disk formats, built once per session
with the real Llama-3 tokenizer, loaded through the same code path as the published models."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import Image

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def tokenizer():
    from vlui.synthetic import llama3_tokenizer

    return llama3_tokenizer()


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory) -> str:
    from vlui.synthetic import write_tiny_llava

    return str(write_tiny_llava(tmp_path_factory.mktemp("tiny-llava")))


@pytest.fixture(scope="session")
def tiny_360vl_dir(tmp_path_factory) -> str:
    from vlui.synthetic import write_tiny_360vl

    return str(write_tiny_360vl(tmp_path_factory.mktemp("tiny-360vl")))


@pytest.fixture(scope="session")
def llava_model(tiny_llava_dir):
    from vlui.models import load_model

    return load_model(tiny_llava_dir, device="cpu")


@pytest.fixture(scope="session")
def qh360vl_model(tiny_360vl_dir):
    from vlui.models import load_model

    return load_model(tiny_360vl_dir, device="cpu")


def png_bytes(size=(64, 48), color=(200, 30, 30), mode="RGB", fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture
def red_image():
    from vlui.images import load_image

    return load_image(png_bytes((500, 300)), name="red.png")


@pytest.fixture
def image_file(tmp_path) -> str:
    path = tmp_path / "photo.png"
    img = Image.new("RGB", (320, 240), (20, 120, 220))
    img.paste((250, 250, 0), (100, 60, 220, 180))
    img.save(path)
    return os.fspath(path)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningApp:
    """`python app.py` as a user starts it, in a subprocess, on a free port."""

    def __init__(self, model_dir: str, *extra: str):
        import subprocess
        import sys
        import time
        import urllib.request

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = ARTIFACTS / f"app-{self.port}.log"
        ARTIFACTS.mkdir(exist_ok=True)
        self._log = open(self.log_path, "w")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "app.py", "--model", model_dir, "--port", str(self.port), *extra],
            cwd=Path(__file__).resolve().parent.parent, stdout=self._log, stderr=subprocess.STDOUT, env=env,
        )
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app exited early:\n{self.log_path.read_text()}")
            try:
                urllib.request.urlopen(self.url, timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"app did not start:\n{self.log_path.read_text()}")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except Exception:
            self.proc.kill()
        self._log.close()


@pytest.fixture(scope="session")
def llava_app(tiny_llava_dir):
    app = RunningApp(tiny_llava_dir, "--max-batch", "4")
    yield app
    app.stop()
