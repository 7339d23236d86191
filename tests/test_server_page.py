"""The chat page in real headless Chromium (Debian's, driven by playwright)."""

from __future__ import annotations

import os

import pytest

from serverutil import get, live_server, wait_for

CHROMIUM = "/usr/bin/chromium"
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium is not installed")]
sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def server():
    with live_server(model="smollm2-135m", parallel=2, ctx=512) as live:
        yield live


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        pg = browser.new_page()
        external: list[str] = []
        pg.on("request", lambda r: external.append(r.url) if not r.url.startswith(server.url) else None)
        pg.goto(server.url + "/")
        yield pg
        browser.close()
        assert not external, f"the page loaded something from outside: {external}"


def test_streamed_answer_and_conversation(page):
    page.fill("#maxtok", "12")
    page.fill("#temp", "0")
    page.fill("#input", "What is the capital of France?")
    page.press("#input", "Enter")
    answer = page.locator(".msg.assistant").last
    sync_api.expect(answer).to_have_attribute("data-state", "done", timeout=60000)
    assert answer.locator(".text").inner_text().strip()
    assert "tok/s" in answer.locator(".meta").inner_text()
    page.fill("#input", "And of Italy?")
    page.press("#input", "Enter")
    sync_api.expect(page.locator(".msg.assistant")).to_have_count(2)
    sync_api.expect(page.locator(".msg.assistant").last).to_have_attribute("data-state", "done", timeout=60000)
    assert page.locator(".msg.user").count() == 2


def test_stop_a_generation(page, server):
    page.fill("#maxtok", "2000")
    page.fill("#temp", "0.8")
    page.fill("#input", "Write a very long story about a dragon.")
    page.press("#input", "Enter")
    answer = page.locator(".msg.assistant").last
    # wait for some streamed text, then stop
    page.wait_for_function("() => { const m = [...document.querySelectorAll('.msg.assistant')].pop();"
                           " return m && m.querySelector('.text').textContent.length > 20; }", timeout=60000)
    page.click("#stop")
    sync_api.expect(answer).to_have_attribute("data-state", "stopped", timeout=10000)
    assert page.locator("#send").is_enabled()
    assert wait_for(lambda: get(server.url + "/health").json()["slots_processing"] == 0, timeout=2.0)
