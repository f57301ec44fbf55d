"""OpenAI-compatible server: the official `openai` client, error shapes, concurrency, disconnects.
Runs against a FakeEngine (deterministic byte-level 'model'); tests/interop/test_serve_model.py
runs the same server over a real tiny llmcore model."""
import asyncio
import json
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from llmcore.serve.app import create_app  # noqa: E402
from llmcore.serve.engine import FakeEngine  # noqa: E402
from tests.interop._server import running  # noqa: E402

KEY = "sk-test-123"


@pytest.fixture(scope="module")
def server():
    eng = FakeEngine(max_seq_len=256, delay=0.002)
    app = create_app(eng, api_key=KEY)
    with running(app) as url:
        yield url, eng, app


def client(url, key=KEY):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, timeout=20, max_retries=0)


def test_models_and_health(server):
    url, eng, _ = server
    ids = [m.id for m in client(url).models.list()]
    assert ids == ["fake"]
    r = httpx.get(url + "/health", timeout=5)
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_chat_nonstream(server):
    url, eng, _ = server
    r = client(url).chat.completions.create(model="fake", messages=[{"role": "user", "content": "hello"}],
                                            max_tokens=5, temperature=0.5, top_p=0.9)
    prompt = eng.encode_chat([{"role": "user", "content": "hello"}])
    # FakeEngine answers with the prompt reversed
    expect = eng.decode(list(reversed(prompt))[:5])
    assert r.choices[0].message.content == expect
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == 5
    assert r.usage.total_tokens == len(prompt) + 5


def test_chat_stream(server):
    url, eng, _ = server
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo 世界"}]
    stream = client(url).chat.completions.create(model="fake", messages=msgs, stream=True, max_tokens=200,
                                                 stream_options={"include_usage": True})
    parts, finish, usage = [], None, None
    for ch in stream:
        if ch.usage:
            usage = ch.usage
        for c in ch.choices:
            if c.delta.content:
                parts.append(c.delta.content)
            finish = c.finish_reason or finish
    prompt = eng.encode_chat(msgs)
    full = eng.decode(list(reversed(prompt))[:64])
    assert "".join(parts) == full
    assert len(parts) > 3  # really streamed, not one blob
    assert finish == "stop"  # the script ended by itself (end of sequence)
    assert usage.completion_tokens == min(64, len(prompt)) and usage.prompt_tokens == len(prompt)


def test_raw_sse_ends_with_done(server):
    url, _, _ = server
    with httpx.stream("POST", url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "fake", "messages": [{"role": "user", "content": "abc"}], "stream": True},
                      timeout=10) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "stop"


def test_stop_strings(server):
    url, eng, _ = server
    # reversed prompt of "<user>xyzSTOPabc\n<assistant>" starts with ">tnatsissa<\ncbaPOTSzyx"
    r = client(url).chat.completions.create(model="fake", messages=[{"role": "user", "content": "xyzSTOPabc"}],
                                            stop=["cba"], max_tokens=100)
    assert r.choices[0].message.content == ">tnatsissa<\n"
    assert r.choices[0].finish_reason == "stop"
    s = client(url).chat.completions.create(model="fake", messages=[{"role": "user", "content": "xyzSTOPabc"}],
                                            stop=["POTS", "zz"], max_tokens=100, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in s if c.choices)
    assert text == ">tnatsissa<\ncba"


def test_completions(server):
    url, eng, _ = server
    c = client(url)
    r = c.completions.create(model="fake", prompt="abcdef", max_tokens=4)
    assert r.choices[0].text == "fedc" and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == 6 and r.usage.completion_tokens == 4
    s = c.completions.create(model="fake", prompt="abcdef", max_tokens=10, stream=True)
    parts = [ch.choices[0].text for ch in s if ch.choices]
    assert "".join(parts) == "fedcba"


def _post(url, body, key=KEY, raw=None):
    h = {"Content-Type": "application/json"}
    if key:
        h["Authorization"] = f"Bearer {key}"
    return httpx.post(url + "/v1/chat/completions", content=raw if raw is not None else json.dumps(body), headers=h,
                      timeout=10)


def _is_openai_error(r, status, code=None):
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert set(e) >= {"message", "type", "param", "code"} and isinstance(e["message"], str) and e["message"]
    if code is not None:
        assert e["code"] == code
    return e


def test_errors(server):
    url, _, _ = server
    good = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
    _is_openai_error(_post(url, None, raw=b"{not json"), 400)
    _is_openai_error(_post(url, None, raw=b"[1, 2]"), 400)
    _is_openai_error(_post(url, {"model": "fake"}), 400)
    _is_openai_error(_post(url, {**good, "temperature": "hot"}), 400)
    _is_openai_error(_post(url, {**good, "temperature": 5}), 400)
    _is_openai_error(_post(url, {**good, "model": "gpt-9"}), 400, "model_not_found")
    _is_openai_error(_post(url, {**good, "max_tokens": 100000}), 400, "context_length_exceeded")
    _is_openai_error(_post(url, {**good, "messages": [{"role": "user", "content": "x" * 300}]}), 400,
                     "context_length_exceeded")
    _is_openai_error(_post(url, good, key="wrong"), 401, "invalid_api_key")
    _is_openai_error(_post(url, good, key=None), 401, "invalid_api_key")
    r = httpx.get(url + "/v1/models", timeout=5)
    _is_openai_error(r, 401)
    # the official client raises the matching exception types
    with pytest.raises(openai.AuthenticationError):
        client(url, key="nope").models.list()
    with pytest.raises(openai.BadRequestError) as ei:
        client(url).chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert ei.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client(url).completions.create(model="fake", prompt="x", max_tokens=10**6)
    assert _post(url, good).status_code == 200  # server still fine


def test_16_concurrent_streams():
    eng = FakeEngine(max_seq_len=256, delay=0.01)
    app = create_app(eng, max_active=16)
    with running(app) as url:
        async def one(i, ac):
            parts, finish = [], None
            s = await ac.chat.completions.create(model="fake", stream=True, max_tokens=20,
                                                 messages=[{"role": "user", "content": f"client number {i:02d}"}])
            async for ch in s:
                for c in ch.choices:
                    parts.append(c.delta.content or "")
                    finish = c.finish_reason or finish
            return "".join(parts), finish

        async def main():
            ac = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", timeout=30, max_retries=0)
            t0 = time.perf_counter()
            res = await asyncio.wait_for(asyncio.gather(*(one(i, ac) for i in range(16))), 60)
            return res, time.perf_counter() - t0

        res, dt = asyncio.run(main())
        for i, (text, finish) in enumerate(res):
            prompt = eng.encode_chat([{"role": "user", "content": f"client number {i:02d}"}])
            assert text == eng.decode(list(reversed(prompt))[:20]) and finish == "length"
        # interleaved, not serialized: (nearly) all 16 generations were open at the same time (one alone
        # takes 0.2 s; all 16 take ~3.2 s of decode, so only a very late arrival could miss the others)
        assert eng.max_live >= 12 and app.state.scheduler.stats["finished"] == 16


def test_disconnect_stops_generation():
    eng = FakeEngine(max_seq_len=100000, delay=0.01, endless=True, reply="tick ")
    app = create_app(eng)
    sched = app.state.scheduler
    with running(app) as url:
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=10,
                          json={"model": "fake", "messages": [{"role": "user", "content": "go"}], "stream": True,
                                "max_tokens": 50000}) as r:
            got = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    got += 1
                if got >= 10:
                    break
        # connection closed mid-stream: generation must stop promptly, not run 50000 tokens
        deadline = time.monotonic() + 10
        while (sched.num_running() or eng.live) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sched.num_running() == 0 and eng.live == 0
        n = eng.generated
        time.sleep(0.3)
        assert eng.generated == n < 2000
        assert sched.stats["cancelled"] == 1


def test_nonstream_disconnect_stops_generation():
    eng = FakeEngine(max_seq_len=100000, delay=0.01, endless=True, reply="tick ")
    app = create_app(eng)
    sched = app.state.scheduler
    with running(app) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/chat/completions", timeout=0.5,
                       json={"model": "fake", "messages": [{"role": "user", "content": "go"}], "max_tokens": 50000})
        deadline = time.monotonic() + 10
        while (sched.num_running() or eng.live) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sched.num_running() == 0 and eng.live == 0 and eng.generated < 2000
