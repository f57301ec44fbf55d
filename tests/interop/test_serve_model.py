"""The server over a real (tiny, random-init) llmcore model: greedy answers through the official
client equal llmcore.model.generate's, also when several requests interleave on the worker, and
scripts/serve.py starts from a checkpoint and answers on 127.0.0.1."""
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from llmcore.model.generate import generate  # noqa: E402
from llmcore.serve.app import create_app  # noqa: E402
from llmcore.serve.engine import ModelEngine  # noqa: E402
from tests.interop._server import free_port, running  # noqa: E402
from tests.interop.conftest import tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def served(tok):
    # a large init std gives varied (not degenerate) greedy text from a random model
    model = tiny_model(tok.vocab_size, seed=7, init_std=0.3)
    eng = ModelEngine(model, tok, model_id="tiny")
    with running(create_app(eng)) as url:
        yield url, model, tok


def _greedy(model, tok, messages, n):
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    out = generate(model, [ids], max_new_tokens=n, temperature=0, stop_tokens=(tok.eos_id,))[0]
    return tok.decode(out, skip_special_tokens=True), len(ids), len(out)


def test_chat_greedy_matches_generate(served):
    url, model, tok = served
    c = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=60, max_retries=0)
    msgs = [{"role": "user", "content": "Alice 住在哪里？"}]
    want, n_prompt, n_out = _greedy(model, tok, msgs, 12)
    r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
    assert want and r.choices[0].message.content == want
    assert r.usage.prompt_tokens == n_prompt and r.usage.completion_tokens == n_out
    s = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices) == want
    # sampling with a seed is reproducible
    a = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    b = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    assert a.choices[0].message.content == b.choices[0].message.content
    cm = c.completions.create(model="tiny", prompt="The capital", max_tokens=6, temperature=0)
    ids = tok.encode("The capital")
    assert cm.choices[0].text == tok.decode(generate(model, [ids], max_new_tokens=6, temperature=0,
                                                      stop_tokens=(tok.eos_id,))[0], skip_special_tokens=True)


def test_interleaved_requests_match_sequential(served):
    """Requests decode round-robin on one worker, each with its own KV cache: results must equal
    one-at-a-time greedy generation."""
    url, model, tok = served
    prompts = [[{"role": "user", "content": f"question {i}: {'abc' * i}"}] for i in range(6)]
    want = [_greedy(model, tok, m, 16)[0] for m in prompts]
    assert len(set(want)) > 3 and all(want)  # distinct answers, so mixing them up would show

    async def main():
        ac = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", timeout=60, max_retries=0)

        async def one(m):
            s = await ac.chat.completions.create(model="tiny", messages=m, max_tokens=16, temperature=0, stream=True)
            return "".join([ch.choices[0].delta.content or "" async for ch in s if ch.choices])

        return await asyncio.wait_for(asyncio.gather(*(one(m) for m in prompts)), 120)

    assert asyncio.run(main()) == want


def test_serve_script_from_checkpoint(tok_dir, tok, tmp_path):
    from llmcore.train.checkpoint import save_checkpoint

    ck = save_checkpoint(tmp_path / "run", 3, tiny_model(tok.vocab_size, seed=8), meta={"tokenizer_dir": str(tok_dir)})
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "scripts/serve.py", str(ck), "--port", str(port), "--api-key", "k1",
                             "--name", "mini"], cwd=str(ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "timeout"
            time.sleep(0.3)
        c = openai.OpenAI(base_url=url + "/v1", api_key="k1", timeout=60, max_retries=0)
        assert [m.id for m in c.models.list()] == ["mini"]
        r = c.chat.completions.create(model="mini", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert r.usage.completion_tokens <= 4 and r.choices[0].finish_reason in ("stop", "length")
        assert httpx.get(url + "/", timeout=5).text.startswith("<!doctype html>")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="k2", max_retries=0).models.list()
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
