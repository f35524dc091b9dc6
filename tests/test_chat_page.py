"""`llmkit serve`'s chat page at `/`: what the server sends (fast, in-process), then the page itself in a real browser —
Debian's headless chromium driven by Playwright — against a real `llmkit serve` that needs an API key."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.chat_models import endless_chat_model

KEY = "sk-page-test"
PAGE = Path(__file__).resolve().parents[1] / "llmkit" / "serving" / "static" / "chat.html"


def test_the_page_is_served_without_the_key_and_the_api_still_needs_it():
    from fastapi.testclient import TestClient

    from llmkit.serving.app import create_app

    engine = SimpleNamespace(model_name="tiny", names={"tiny"}, adapters={}, created=0, window=None, close=lambda *a: None)
    client = TestClient(create_app(engine, api_key=KEY))
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.text == PAGE.read_text(encoding="utf-8")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp  # the browser itself refuses anything off this server
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0]["id"] == "tiny"


def test_the_page_is_one_offline_file():
    html = PAGE.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)  # no CDN, no remote font, no script from elsewhere
    assert not re.search(r"<script[^>]+src=|<link[^>]+stylesheet", html)  # everything inline: no build step
    assert not re.search(r"\bimport\s*\(|\bimport\s+.*\s+from\s", html)
    for needed in ('fetch("/v1/chat/completions"', 'fetch("/v1/models"', "stream: true", "getReader()", "new AbortController()",
                   '"Bearer " + key', "textContent = answer"):
        assert needed in html
    assert "innerHTML" not in html  # model output is text, never markup


# ------------------------------------------------------------------------------------------------ in a browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[SimpleNamespace]:
    """`llmkit serve --api-key` on a tiny chat model whose answers never end by themselves (time to press Stop)."""
    model = endless_chat_model(tmp_path_factory.mktemp("page") / "tiny-chat")
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "llmkit", "serve", "--model", str(model), "--backend", "transformers",
                                 "--api-key", KEY, "--port", "0", "--threads", "1"],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 120
    while not (found := re.search(r"serving (\S+) on (http://\S+) ", log.read_text())):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"llmkit serve did not start:\n{log.read_text()}")
        time.sleep(0.1)
    yield SimpleNamespace(model=found.group(1), url=found.group(2), log=log)
    proc.terminate()
    assert proc.wait(60) == 0
    assert "Traceback" not in log.read_text()


def _in_flight(url: str) -> int:
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        return json.loads(r.read())["in_flight"]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (apt-get install chromium; `make test` does)")
def test_chat_in_a_real_browser_streams_and_stops(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            requests: list = []
            page.on("request", lambda r: requests.append(r))
            page.goto(server.url + "/")

            # the page loads without the key, then asks for it; with it, the model's name comes from /v1/models
            expect(page.locator("#model")).to_have_text(re.compile("needs an API key"), timeout=15_000)
            page.fill("#api-key", KEY)
            page.press("#api-key", "Enter")
            expect(page.locator("#model")).to_have_text(server.model, timeout=15_000)

            page.fill("#system", "You are terse.")
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "3000")
            page.fill("#input", "Tell me a long story")
            page.press("#input", "Enter")

            # the answer streams in: watch its text grow, update by update
            page.wait_for_selector(".msg.assistant .text")
            page.evaluate("""() => {
                window.lengths = [];
                const text = document.querySelector('.msg.assistant .text');
                new MutationObserver(() => window.lengths.push(text.textContent.length))
                    .observe(text, {childList: true, characterData: true, subtree: true});
            }""")
            page.wait_for_function("() => new Set(window.lengths).size >= 5", timeout=60_000)
            expect(page.locator("#stop")).to_be_enabled()
            expect(page.locator("#send")).to_be_disabled()
            page.click("#stop")

            expect(page.locator(".msg.assistant")).to_have_class(re.compile(r"\bstopped\b"), timeout=5_000)
            expect(page.locator("#status")).to_have_text("stopped")
            expect(page.locator("#send")).to_be_enabled()
            expect(page.locator("#stop")).to_be_disabled()
            lengths = page.evaluate("window.lengths")
            assert lengths == sorted(lengths) and lengths[-1] > lengths[0] > 0  # partial updates, each longer
            partial = page.locator(".msg.assistant .text").text_content()
            time.sleep(1.5)
            assert page.locator(".msg.assistant .text").text_content() == partial  # it really stopped...
            deadline = time.monotonic() + 15
            while _in_flight(server.url) and time.monotonic() < deadline:  # ...on the server too: the abort freed the slot
                time.sleep(0.2)
            assert _in_flight(server.url) == 0
            page.screenshot(path=str(tmp_path / "chat-page.png"), full_page=True)

            # the next turn carries the conversation, the system prompt, the settings and the key
            page.fill("#max-tokens", "4")
            page.fill("#input", "And then?")
            page.press("#input", "Enter")
            expect(page.locator("#status")).to_have_text("stopped at max tokens", timeout=30_000)
            expect(page.locator(".msg.assistant")).to_have_count(2)
            chat = [r for r in requests if r.url.endswith("/v1/chat/completions")]
            assert len(chat) == 2
            assert chat[-1].headers["authorization"] == f"Bearer {KEY}"
            body = json.loads(chat[-1].post_data)
            assert body["stream"] is True and body["temperature"] == 0 and body["max_tokens"] == 4 and body["model"] == server.model
            assert body["messages"] == [{"role": "system", "content": "You are terse."},
                                        {"role": "user", "content": "Tell me a long story"},
                                        {"role": "assistant", "content": partial},
                                        {"role": "user", "content": "And then?"}]
            page.screenshot(path=str(tmp_path / "chat-page-2.png"), full_page=True)

            page.click("#new-chat")  # a new conversation: only the system prompt stays
            expect(page.locator(".msg")).to_have_count(0)
            page.fill("#input", "Hello again")
            page.press("#input", "Enter")
            expect(page.locator(".msg.assistant")).to_have_count(1)
            expect(page.locator("#status")).to_have_text("stopped at max tokens", timeout=30_000)
            chat = [r for r in requests if r.url.endswith("/v1/chat/completions")]
            assert json.loads(chat[-1].post_data)["messages"] == [{"role": "system", "content": "You are terse."},
                                                                  {"role": "user", "content": "Hello again"}]
            assert all(r.url.startswith(server.url + "/") for r in requests)  # nothing fetched from anywhere else
        finally:
            browser.close()
    assert (tmp_path / "chat-page.png").stat().st_size > 10_000
    if os.environ.get("LLMKIT_KEEP_SCREENSHOTS"):  # to look at them: LLMKIT_KEEP_SCREENSHOTS=DIR pytest ...
        for png in tmp_path.glob("*.png"):
            shutil.copy(png, Path(os.environ["LLMKIT_KEEP_SCREENSHOTS"]) / png.name)
