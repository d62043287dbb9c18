"""A new user in a real headless browser (Debian's chromium, driven by Playwright): upload an image,
ask in English, follow up in Chinese, watch the answer grow, press Stop, ask again; the interface in
Chinese. Screenshots go to test-artifacts/."""

from __future__ import annotations

import os
import shutil
import time

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM and os.environ.get("VLUI_REQUIRE_BROWSER") != "1":
    pytest.skip("Debian's chromium is not installed (apt install chromium)", allow_module_level=True)

from playwright.sync_api import expect, sync_playwright  # noqa: E402

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM, "chromium is required (VLUI_REQUIRE_BROWSER=1)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def last_answer(page) -> str:
    bots = page.locator('#chat [data-testid="bot"]')
    return bots.last.inner_text() if bots.count() else ""


def send(page, text: str, image: str | None = None) -> None:
    if image:
        page.set_input_files("#input input[type=file]", image)
        expect(page.locator("#input img").first).to_be_visible()
    page.fill("#input textarea", text)
    page.keyboard.press("Enter")


def wait_for_status(page, words: str, timeout: float = 60) -> str:
    expect(page.locator("#status")).to_contain_text(words, timeout=timeout * 1000)
    return page.locator("#status").inner_text()


def test_a_new_user_chats_about_an_image(browser, llava_app, artifacts_dir):
    page = browser.new_page(locale="en-US", viewport={"width": 1280, "height": 1000})
    page.goto(llava_app.url)
    expect(page.locator("#stop")).to_have_text("Stop")
    send(page, "What is written on this note?", "assets/note.png")
    expect(page.locator('#chat [data-testid="user"] img').first).to_be_visible(timeout=30_000)
    # The answer grows while we watch.
    grown = []
    deadline = time.time() + 30
    while time.time() < deadline and len(set(grown)) < 3:
        grown.append(len(last_answer(page)))
        time.sleep(0.05)
    assert len(set(grown)) >= 3, grown
    wait_for_status(page, "tokens")
    first_answer = last_answer(page)
    assert first_answer

    send(page, "它是什么颜色的？请用中文回答。")
    expect(page.locator('#chat [data-testid="bot"]')).to_have_count(2, timeout=30_000)
    wait_for_status(page, "tokens")
    assert last_answer(page)

    # A long answer, stopped half way.
    send(page, "Now write a very long story about this note.")
    expect(page.locator('#chat [data-testid="bot"]')).to_have_count(3, timeout=30_000)
    page.wait_for_function(
        "() => { const b = document.querySelectorAll('#chat [data-testid=bot]'); return b.length >= 3 && b[2].innerText.length > 20 }",
        timeout=30_000,
    )
    page.click("#stop")
    wait_for_status(page, "(stopped)")
    length = len(last_answer(page))
    time.sleep(1.0)
    assert len(last_answer(page)) == length  # nothing arrives after Stop

    send(page, "One more question: what shape is it?")
    expect(page.locator('#chat [data-testid="bot"]')).to_have_count(4, timeout=30_000)
    wait_for_status(page, "tokens")
    page.screenshot(path=str(artifacts_dir / "browser-en.png"), full_page=True)
    page.close()


def test_interface_in_chinese_and_switchable(browser, llava_app, artifacts_dir):
    page = browser.new_page(locale="zh-CN", viewport={"width": 1280, "height": 900})
    page.goto(llava_app.url)
    expect(page.locator("#stop")).to_have_text("停止", timeout=30_000)
    expect(page.locator("#clear")).to_have_text("清空")
    page.get_by_text("English", exact=True).click()
    expect(page.locator("#stop")).to_have_text("Stop", timeout=10_000)
    page.get_by_text("中文", exact=True).click()
    expect(page.locator("#stop")).to_have_text("停止", timeout=10_000)
    send(page, "你好，请描述这张图片。", "assets/shapes.png")
    expect(page.locator('#chat [data-testid="bot"]')).to_have_count(1, timeout=30_000)
    wait_for_status(page, "个 token")
    page.screenshot(path=str(artifacts_dir / "browser-zh.png"), full_page=True)
    page.close()


def test_undo_puts_the_question_back_and_clear_starts_over(browser, llava_app):
    page = browser.new_page(locale="en-US")
    page.goto(llava_app.url)
    send(page, "A question to take back")
    expect(page.locator('#chat [data-testid="bot"]')).to_have_count(1, timeout=30_000)
    wait_for_status(page, "tokens")
    page.click("#undo")
    expect(page.locator('#chat [data-testid="user"]')).to_have_count(0)
    expect(page.locator("#input textarea")).to_have_value("A question to take back")
    page.locator("#input textarea").press("Enter")
    expect(page.locator('#chat [data-testid="bot"]')).to_have_count(1, timeout=30_000)
    wait_for_status(page, "tokens")
    page.click("#clear")
    expect(page.locator('#chat [data-testid="bot"]')).to_have_count(0)
    page.close()


def test_a_hostile_upload_is_explained_and_the_question_kept(browser, llava_app, tmp_path):
    from tests.test_images import bomb_png

    bomb = tmp_path / "holiday.png"
    bomb.write_bytes(bomb_png(8_000, 8_000))  # declares 64 MP: refused before decoding
    page = browser.new_page(locale="en-US")
    page.goto(llava_app.url)
    send(page, "keep this question", str(bomb))
    expect(page.get_by_text("holiday.png' is 8000x8000 pixels (64 MP); the limit is 50 MP")).to_be_visible(timeout=30_000)
    expect(page.locator("#input textarea")).to_have_value("keep this question")
    expect(page.locator('#chat [data-testid="user"]')).to_have_count(0)
    page.close()
