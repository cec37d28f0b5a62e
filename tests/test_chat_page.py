"""The chat page of `lmforge serve` (src/lmforge/static/chat.html) in a real headless Chromium,
driven by Selenium against the tiny model of test_serve.py. Needs Debian's `chromium` and
`chromium-driver` packages and `pip install selenium`; skipped, saying which is missing, without them.
A screenshot is kept in tmp_path, and copied to $LMFORGE_ARTIFACTS when that is set."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import headless_chromium
from test_serve import KEY, QA, chat, one_thread, running, tiny_assistant  # noqa: F401  (one_thread: a fixture)

IDS = ("input", "send", "stop", "reset", "messages", "temperature", "max-tokens", "api-key", "error")


@pytest.fixture(scope="module")
def page_server(one_thread):  # noqa: F811
    import openai

    from lmforge.serve import make_app

    app = make_app(tiny_assistant(), api_key=KEY, max_batch=4)
    with running(app) as url:
        yield SimpleNamespace(url=url, app=app, assistant=app.state.worker.assistant,
                              client=openai.OpenAI(api_key=KEY, base_url=url + "/v1", max_retries=0, timeout=60))


@pytest.fixture(scope="module")
def browser():
    yield from headless_chromium("1000,800")


def wait_for(predicate, timeout: float = 30.0, what: str = "the page"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def answers(driver) -> list[dict]:
    """Each assistant message on the page: its exact text and whether it has finished."""
    return driver.execute_script("""return [...document.querySelectorAll('.message[data-role=assistant]')].map(
        m => ({text: m.querySelector('.content').textContent, done: m.dataset.done === 'true'}));""")


def open_page(driver, url: str, key: str = KEY) -> None:
    driver.get(url + "/")
    wait_for(lambda: driver.execute_script("return document.body.dataset.ready === 'true'"), what="the page to start")
    box = driver.find_element("id", "api-key")
    assert box.is_displayed()  # this server wants a key: the page asks for it
    box.clear()
    box.send_keys(key)
    for field, value in (("temperature", "0"), ("max-tokens", "")):
        el = driver.find_element("id", field)
        el.clear()
        el.send_keys(value)


def say(driver, text: str) -> str:
    """Type a message, send it, and wait for the streamed answer to finish; returns it."""
    before = len(answers(driver))
    driver.find_element("id", "input").send_keys(text)
    driver.find_element("id", "send").click()

    def finished() -> tuple[str] | None:
        now = answers(driver)  # one snapshot: the page changes between two calls
        error = driver.find_element("id", "error").text
        assert not error, f"the page showed an error: {error}"
        return (now[-1]["text"],) if len(now) > before and now[-1]["done"] else None

    return wait_for(finished, what="the answer")[0]


def test_the_page_is_served_with_its_controls_and_nothing_from_elsewhere(page_server):
    import urllib.request

    with urllib.request.urlopen(page_server.url + "/") as r:
        html = r.read().decode()
        assert r.headers["Content-Type"].startswith("text/html")
        assert "default-src 'self'" in r.headers["Content-Security-Policy"]
    assert all(f'id="{i}"' in html for i in IDS)
    assert "http://" not in html and "https://" not in html and "//cdn" not in html  # works offline


def test_a_typed_message_streams_in_and_equals_the_servers_greedy_answer(page_server, browser, tmp_path):
    model = page_server.assistant.model
    open_page(browser, page_server.url)
    slow = model.register_forward_hook(lambda *_: time.sleep(0.03))  # slow enough to watch the text grow
    try:
        browser.find_element("id", "input").send_keys("hi")
        browser.find_element("id", "send").click()
        seen, now = set(), []
        while not (now and now[-1]["done"]):
            now = answers(browser)
            seen.add(now[-1]["text"] if now else "")
            time.sleep(0.01)
    finally:
        slow.remove()
    first = now[-1]["text"]
    assert first == chat(page_server.client, "hi", temperature=0).choices[0].message.content == QA["hi"]
    assert len([s for s in seen if s and s != first]) >= 2  # it came in pieces, not all at the end

    second = say(browser, "tell me a saying")  # the page sends the whole conversation
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "tell me a saying"}]
    assert second == chat(page_server.client, history, temperature=0).choices[0].message.content
    assert second == QA["tell me a saying"]  # what the model learned to answer after that first turn

    shot = tmp_path / "chat_page.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 5000
    if os.environ.get("LMFORGE_ARTIFACTS"):
        out = Path(os.environ["LMFORGE_ARTIFACTS"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, out / shot.name)

    browser.find_element("id", "reset").click()
    assert answers(browser) == []
    # A fresh conversation: the question alone, not after the two turns before it.
    assert say(browser, "what glitters?") == QA["what glitters?"]


def test_a_wrong_key_shows_the_servers_error_and_takes_the_question_back(page_server, browser):
    open_page(browser, page_server.url, key="wrong")
    browser.find_element("id", "input").send_keys("hi")
    browser.find_element("id", "send").click()
    error = wait_for(lambda: browser.find_element("id", "error").text, what="the error")
    assert "API key" in error
    assert answers(browser) == [] and browser.find_element("id", "send").is_enabled()
    assert browser.find_element("id", "input").get_attribute("value") == "hi"  # ready to send again
    box = browser.find_element("id", "api-key")
    box.clear()
    box.send_keys(KEY)
    assert say(browser, "") == QA["hi"]
    assert browser.find_element("id", "error").text == ""


def test_a_conversation_longer_than_the_context_leaves_its_oldest_turns_out_and_says_so(page_server, browser):
    assistant = page_server.assistant
    first = "the quick brown fox"
    while len(assistant.prompt_ids([{"role": "user", "content": first + " the quick brown fox"}])) < 100:
        first += " the quick brown fox"
    open_page(browser, page_server.url)
    browser.find_element("id", "reset").click()
    reply = say(browser, first)  # fits alone (under 128 tokens), and its answer fills the rest
    history = [{"role": "user", "content": first}, {"role": "assistant", "content": reply},
               {"role": "user", "content": "what glitters?"}]
    assert len(assistant.prompt_ids(history)) >= assistant.context_length  # the server alone would refuse it
    # Once the page showed "This model's maximum context length is 128 tokens" until Reset.
    assert say(browser, "what glitters?") == QA["what glitters?"]  # answered without the first turn
    note = browser.execute_script(
        "const m = [...document.querySelectorAll('.message[data-role=assistant]')].pop();"
        "return [m.dataset.leftOut, m.querySelector('.note').textContent];")
    assert note == ["2", "2 earlier messages left out: the conversation is longer than the model's context"]
    assert len(answers(browser)) == 2  # the page still shows the whole conversation
    say(browser, "hi")  # the conversation goes on: no error (what is answered depends on what fits)
