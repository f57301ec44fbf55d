"""The web chat page in headless Chromium (Debian's chromium + the playwright Python driver, no
browser download): load /, send a message, watch the answer arrive in several streamed chunks, then
a second turn that must send the whole history (what the engine receives is recorded)."""
import os
import shutil
import tempfile

import pytest

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")

from llmcore.serve.app import create_app  # noqa: E402
from llmcore.serve.engine import FakeEngine  # noqa: E402
from tests.interop._server import running  # noqa: E402

CHROMIUM = os.environ.get("LLMCORE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (bash scripts/setup_browser.sh)")

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage"]


class RecordingEngine(FakeEngine):
    """FakeEngine that records the messages and sampling parameters of every request."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen, self.params = [], []

    def encode_chat(self, messages):
        self.seen.append([dict(m) for m in messages])
        return super().encode_chat(messages)

    def generate(self, prompt_ids, params):
        self.params.append(params)
        return super().generate(prompt_ids, params)


def test_chat_page_streams_answer():
    reply = "Hello from llmcore, streamed token by token."
    eng = RecordingEngine(reply=reply, delay=0.02, model_id="fake")
    app = create_app(eng)
    with running(app) as url, tempfile.TemporaryDirectory() as profile:
        with sync_api.sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True,
                                                        args=ARGS, timeout=60_000)
            try:
                page = ctx.new_page()
                page.set_default_timeout(30_000)
                page.goto(url + "/")
                page.wait_for_function("document.getElementById('model').textContent === 'fake'")
                page.fill("#temperature", "0.3")
                page.fill("#input", "hi there")
                page.click("#send")
                page.wait_for_selector(".msg.user")
                # partial text shows up before the answer is complete (streaming)
                page.wait_for_function("(() => { const a = document.querySelector('.msg.assistant');"
                                       " return a && a.textContent.length > 0 && a.dataset.done === 'false'; })()")
                page.wait_for_function("document.querySelector('.msg.assistant').dataset.done === 'true'")
                text = page.inner_text(".msg.assistant")
                chunks = int(page.get_attribute(".msg.assistant", "data-chunks"))
                assert text == reply
                assert chunks > 5  # many SSE deltas, not one blob
                assert page.inner_text(".msg.user") == "hi there"
                # a second turn carries the history (the fake answers with its scripted reply again)
                page.fill("#input", "again")
                page.click("#send")
                page.wait_for_function("document.querySelectorAll('.msg.assistant').length === 2 && "
                                       "document.querySelectorAll('.msg.assistant')[1].dataset.done === 'true'")
                assert page.inner_text(".msg.assistant >> nth=1") == reply
                assert eng.seen == [[{"role": "user", "content": "hi there"}],
                                    [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": reply},
                                     {"role": "user", "content": "again"}]]
                assert [p.temperature for p in eng.params] == [0.3, 0.3] and eng.params[0].top_p == 0.9
            finally:
                ctx.close()
