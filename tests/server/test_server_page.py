"""The chat page in real headless Chromium (Debian's, driven by playwright)."""

from __future__ import annotations

import os

import pytest

from tests.serverutil import get, live_server, wait_for

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


def test_the_page_sends_every_setting(page, server):
    """The page is a door too: with settings from its panel it gets the same answer as the API
    given the same options (through the official client)."""
    openai = pytest.importorskip("openai")
    page.click("#clear")
    page.click("#more summary")
    settings = {"#temp": "0.9", "#maxtok": "16", "#system": "You answer in one word.", "#top_p": "0.8",
                "#top_k": "20", "#min_p": "0.02", "#repeat_penalty": "1.1", "#presence_penalty": "0.3",
                "#frequency_penalty": "0.2", "#seed": "7", "#stop_at": "zebra"}
    for sel, value in settings.items():
        page.fill(sel, value)
    page.fill("#input", "Name a colour.")
    with page.expect_request("**/v1/chat/completions") as sent:
        page.press("#input", "Enter")
    body = sent.value.post_data_json
    assert body["model"] == page.locator("#models").input_value() == "smollm2-135m:" + body["model"].split(":")[1]
    assert {k: body.get(k) for k in ("temperature", "max_tokens", "top_p", "top_k", "min_p", "repeat_penalty",
                                     "presence_penalty", "frequency_penalty", "seed", "stop")} == {
        "temperature": 0.9, "max_tokens": 16, "top_p": 0.8, "top_k": 20, "min_p": 0.02, "repeat_penalty": 1.1,
        "presence_penalty": 0.3, "frequency_penalty": 0.2, "seed": 7, "stop": ["zebra"]}
    assert body["messages"][0] == {"role": "system", "content": "You answer in one word."}
    answer = page.locator(".msg.assistant").last
    sync_api.expect(answer).to_have_attribute("data-state", "done", timeout=60000)
    client = openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0, timeout=60)
    msgs = [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Name a colour."}]
    r = client.chat.completions.create(
        model="smollm2-135m", max_tokens=16, temperature=0.9, top_p=0.8, presence_penalty=0.3,
        frequency_penalty=0.2, seed=7, stop=["zebra"], messages=msgs,
        extra_body={"top_k": 20, "min_p": 0.02, "repeat_penalty": 1.1})
    # the raw answer (the bubble shows it rendered as markdown)
    assert page.evaluate("window.localllm.history().at(-1).content") == r.choices[0].message.content
    # the same request without the panel's settings answers otherwise: the settings mattered
    plain = client.chat.completions.create(model="smollm2-135m", max_tokens=16, temperature=0.9, seed=7,
                                           messages=[{"role": "user", "content": "Name a colour."}])
    assert plain.choices[0].message.content != r.choices[0].message.content


HOSTILE = ('**bold** <img src=x onerror="window.pwned=1"> <script>window.pwned=2</script> '
           '[link](javascript:window.pwned=3) <a href="https://example.org" onclick="window.pwned=4">x</a>\n\n'
           '```python\nprint("<b>not bold</b>")\n```')


def test_answers_render_as_sanitized_markdown(page):
    """The vendored marked + DOMPurify, in the page, on a hostile answer: markdown stays, script goes."""
    got = page.evaluate("""(md) => {
        const el = document.createElement("div");
        window.localllm.renderMarkdown(el, md);
        document.body.appendChild(el);
        const a = [...el.querySelectorAll("a")];
        return {strong: el.querySelector("strong")?.textContent, code: el.querySelector("pre code")?.textContent,
                handlers: [...el.querySelectorAll("*")].flatMap(e => [...e.attributes].map(x => x.name))
                          .filter(n => n.startsWith("on")),
                scripts: el.querySelectorAll("script").length, bold_in_code: el.querySelectorAll("pre b").length,
                hrefs: a.map(x => x.getAttribute("href")), targets: a.map(x => x.rel)};
    }""", HOSTILE)
    assert got["strong"] == "bold" and got["code"] == 'print("<b>not bold</b>")\n'
    assert got["handlers"] == [] and got["scripts"] == 0 and got["bold_in_code"] == 0
    assert not any(h and h.startswith("javascript:") for h in got["hrefs"]) and "https://example.org" in got["hrefs"]
    assert all(t == "noopener noreferrer" for t in got["targets"])
    page.wait_for_timeout(300)
    assert page.evaluate("window.pwned") is None


def test_a_user_message_with_html_is_shown_as_text(page):
    page.click("#clear")
    page.fill("#maxtok", "4")
    page.fill("#input", '<b>hi</b><img src=x onerror="window.pwned=5">')
    page.press("#input", "Enter")
    user = page.locator(".msg.user").last
    sync_api.expect(page.locator(".msg.assistant").last).to_have_attribute("data-state", "done", timeout=60000)
    assert user.locator("b, img").count() == 0
    assert user.inner_text() == '<b>hi</b><img src=x onerror="window.pwned=5">'
    assert page.evaluate("window.pwned") is None


def test_model_picker_and_token_count_match_the_server(page, server):
    from tests.serverutil import post

    ids = [m["id"] for m in get(server.api + "/models").json()["data"]]
    assert page.locator("#models option").evaluate_all("os => os.map(o => o.value)") == ids
    page.click("#clear")
    page.fill("#maxtok", "8")
    page.fill("#input", "Hello there")
    page.press("#input", "Enter")
    sync_api.expect(page.locator(".msg.assistant").last).to_have_attribute("data-state", "done", timeout=60000)
    page.wait_for_function("() => document.querySelector('#tokens').dataset.count", timeout=10000)
    sent = page.evaluate("window.localllm.conversation()")   # the system message of the panel, then the turns
    assert [m["role"] for m in sent][-2:] == ["user", "assistant"] and sent[-2]["content"] == "Hello there"
    want = len(post(server.url + "/tokenize", json={"messages": sent}).json()["tokens"])
    context = get(server.api + "/models").json()["data"][0]["meta"]["context"]
    page.wait_for_function(f"() => document.querySelector('#tokens').dataset.count == '{want}'", timeout=10000)
    assert page.locator("#tokens").inner_text() == f"{want} / {context} tokens"
