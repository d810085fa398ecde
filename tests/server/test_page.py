"""The chat page at / in headless Chromium: attach an image, see its token count, stream answers, errors, stop."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from serverutil import image_message, png_bytes

IN_CI = os.environ.get("CI", "").lower() == "true"
CHROMIUM = Path("/usr/bin/chromium")  # Debian's; playwright must never download a browser of its own
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
MAX_TOKENS = "24"  # short answers: the suite runs on a 2-core CPU
TIMEOUT_MS = 30_000

if IN_CI:
    from playwright.sync_api import expect, sync_playwright
else:
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    expect, sync_playwright = sync_api.expect, sync_api.sync_playwright

COUNT = re.compile(r"^([\d,]+) prompt tokens(?: \(([\d,]+) for images\))? of ([\d,]+)")

# Records, on every change below #log, the text length of the last assistant bubble and whether Stop was shown.
WATCH_STREAM = """() => {
  window.streamed = [];
  const log = document.getElementById("log");
  new MutationObserver(() => {
    const bubbles = log.querySelectorAll(".message.assistant");
    if (!bubbles.length) return;
    window.streamed.push({index: bubbles.length - 1, length: bubbles[bubbles.length - 1].textContent.length,
                          stopShown: !document.getElementById("stop").hidden});
  }).observe(log, {childList: true, subtree: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} not found (Debian: apt-get install chromium)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 900, "height": 800})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page_errors: list[str] = []
    page.on("pageerror", lambda exc: page_errors.append(str(exc)))
    page.goto(server.url + "/")
    expect(page.locator("#model")).to_contain_text(server.model)
    page.click("#settings summary")
    page.fill("#max-tokens", MAX_TOKENS)
    page.fill("#temperature", "0")  # greedy
    yield page
    context.close()
    assert not page_errors, f"JavaScript errors on the page: {page_errors}"


def token_count(page) -> tuple[int, int, int]:
    """(prompt tokens, image tokens, context length) once #token-count shows a count."""
    locator = page.locator("#token-count")
    expect(locator).to_have_text(COUNT)
    expect(locator).to_have_attribute("data-state", re.compile("ok|warn"))
    match = COUNT.match(locator.text_content())
    return tuple(int((g or "0").replace(",", "")) for g in match.groups())


def server_count(server, messages: list[dict]) -> int:
    response = httpx.post(server.api + "/tokenize", json={"messages": messages}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["count"]


def done_answers(page):
    return page.locator(".message.assistant[data-done='true']")


def test_page_streams_a_multi_turn_chat_about_an_image(page, server, tmp_path):
    image = png_bytes(64, 48, seed=3)
    (tmp_path / "photo.png").write_bytes(image)
    page.set_input_files("#file", str(tmp_path / "photo.png"))
    expect(page.locator("#attachments img")).to_have_count(1)

    # The count is there before sending, images included, and follows the text (debounced).
    count, image_tokens, limit = token_count(page)
    assert count > image_tokens > 0 and limit > count
    question = "What is in this picture?"
    page.fill("#prompt", question)
    expected = server_count(server, [image_message(question, image)])
    expect(page.locator("#token-count")).to_contain_text(f"{expected:,} prompt tokens")

    page.evaluate(WATCH_STREAM)
    page.press("#prompt", "Enter")
    answers = done_answers(page)
    expect(answers).to_have_count(1)
    first = answers.nth(0).text_content()
    assert first
    expect(page.locator(".message.user")).to_have_count(1)
    expect(page.locator(".message.user img")).to_have_count(1)
    expect(page.locator("#attachments img")).to_have_count(0)
    expect(page.locator("#prompt")).to_have_value("")
    expect(page.locator("#send")).to_be_visible()
    expect(page.locator("#stop")).to_be_hidden()
    expect(page.locator("#log .error")).to_have_count(0)

    # The text grew piece by piece while Stop was shown.
    seen = [s for s in page.evaluate("window.streamed") if s["index"] == 0 and s["length"] > 0]
    lengths = [s["length"] for s in seen]
    assert len(set(lengths)) >= 2, f"the answer did not stream: {lengths}"
    assert lengths == sorted(lengths) and lengths[-1] == len(first)
    assert all(s["stopShown"] for s in seen if s["length"] < len(first))

    # Second turn: the whole conversation goes again, image and first answer included.
    page.fill("#prompt", "And the colours?")
    with page.expect_request("**/v1/chat/completions") as request:
        page.click("#send")
    body = request.value.post_data_json
    assert body["stream"] is True and body["temperature"] == 0 and body["max_tokens"] == int(MAX_TOKENS)
    messages = body["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[0] == image_message(question, image)
    assert messages[1] == {"role": "assistant", "content": first}
    assert messages[2] == {"role": "user", "content": "And the colours?"}
    expect(answers).to_have_count(2)
    assert answers.nth(1).text_content()
    expect(page.locator(".message.user")).to_have_count(2)
    expect(page.locator("#log .error")).to_have_count(0)

    # The count now covers the conversation so far; "New chat" clears it all.
    count_after, _, _ = token_count(page)
    assert count_after > count
    page.click("#new-chat")
    expect(page.locator("#log .message")).to_have_count(0)
    expect(page.locator("#token-count")).to_have_text("")


def test_a_corrupt_image_shows_an_error(page, server, tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(np.random.default_rng(7).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    page.set_input_files("#file", str(bad))
    expect(page.locator("#attachments img")).to_have_count(1)
    counter = page.locator("#token-count")
    expect(counter).to_have_attribute("data-state", "bad")
    expect(counter).to_contain_text("image 1")

    page.fill("#prompt", "What is this?")
    page.click("#send")
    error = page.locator("#log .error")
    expect(error).to_have_count(1)
    expect(error).to_contain_text("image 1")
    expect(page.locator(".message.assistant")).to_have_count(0)
    expect(page.locator("#send")).to_be_visible()
    # The failed turn is not kept: its text and image come back to the composer to fix and send again.
    expect(page.locator("#prompt")).to_have_value("What is this?")
    expect(page.locator("#attachments img")).to_have_count(1)
    page.click("#attachments button.remove")
    expect(page.locator("#attachments img")).to_have_count(0)
    token_count(page)
    with page.expect_request("**/v1/chat/completions") as request:
        page.press("#prompt", "Enter")
    assert request.value.post_data_json["messages"] == [{"role": "user", "content": "What is this?"}]
    expect(done_answers(page)).to_have_count(1)
    assert done_answers(page).nth(0).text_content()


def test_stop_cancels_the_answer_on_the_server(page, server):
    before = server.metrics()["phivision_requests_aborted_total"]
    page.fill("#max-tokens", "1900")  # far more than arrives before Stop is pressed
    page.fill("#prompt", "Tell a long story.")
    page.click("#send")
    answer = page.locator(".message.assistant")
    expect(answer).not_to_have_text("")
    page.click("#stop")
    expect(answer).to_have_attribute("data-done", "true")
    expect(page.locator("#log .meta")).to_contain_text("stopped")
    expect(page.locator("#send")).to_be_visible()
    deadline = time.monotonic() + 10
    while server.metrics()["phivision_requests_aborted_total"] <= before:
        assert time.monotonic() < deadline, "the server did not cancel the stopped request"
        time.sleep(0.1)
