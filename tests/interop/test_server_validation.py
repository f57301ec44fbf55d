"""Every bad request gets a 400 in OpenAI's error shape, never a 500 or a silent acceptance: a table
that walks every request field of /v1/chat/completions and /v1/completions (types, ranges, non-finite
numbers, NaN/Infinity literals, oversized integers, message roles and content-part shapes, stop, the
features this server does not implement), sent as raw bytes (the official client refuses to encode
NaN), plus a table of valid requests the checks must still let through, and streams that fail after
their headers (an error event, then `data: [DONE]`). Runs against the FakeEngine; the same checks in
front of the real model (seeds, sampler edge values) are in test_serve_model.py."""
import json

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from llmcore.serve.app import create_app  # noqa: E402
from llmcore.serve.engine import FakeEngine  # noqa: E402
from tests.interop._server import running  # noqa: E402

CHAT = '{"model": "fake", "messages": [{"role": "user", "content": "hi"}]%s}'
COMP = '{"model": "fake", "prompt": "abc"%s}'
UA, UB = '{"role": "user", "content": ', '}'  # a user message around a content value


def msgs(*items):
    """A raw `"messages": [...]` fragment (a later key replaces the body's default one)."""
    return ', "messages": [' + ", ".join(items) + "]"


# (endpoint, raw fragment appended to the default body, the `param` the error must name)
BAD = [
    # non-standard JSON constants and numbers that parse to infinity
    ("chat", ', "temperature": NaN', "temperature"),
    ("chat", ', "temperature": Infinity', "temperature"),
    ("chat", ', "temperature": -Infinity', "temperature"),
    ("chat", ', "temperature": 1e400', "temperature"),
    ("chat", ', "top_p": NaN', "top_p"),
    ("chat", ', "max_tokens": NaN', "max_tokens"),
    ("chat", ', "max_tokens": Infinity', "max_tokens"),
    ("chat", ', "max_tokens": NaN, "stream": true', "max_tokens"),
    ("chat", ', "max_completion_tokens": Infinity', "max_completion_tokens"),
    ("chat", ', "seed": NaN', "seed"),
    ("chat", ', "top_k": -Infinity', "top_k"),
    ("chat", ', "repetition_penalty": NaN', "repetition_penalty"),
    ("chat", ', "frequency_penalty": NaN', "frequency_penalty"),
    ("chat", ', "presence_penalty": -1e999', "presence_penalty"),
    ("chat", ', "n": NaN', "n"),
    ("chat", ', "metadata": {"k": NaN}', "metadata.k"),
    ("chat", ', "stop": ["a", Infinity]', "stop[1]"),
    ("chat", msgs(UA + '"x", "name": NaN' + UB), "messages[0].name"),
    # integers out of what the sampler takes / out of range / not integers
    ("chat", f', "seed": {2**70}', "seed"),
    ("chat", f', "seed": {2**70}, "stream": true', "seed"),
    ("chat", f', "seed": {2**64}', "seed"),
    ("chat", f', "seed": {-2**63 - 1}', "seed"),
    ("chat", ', "seed": 1.5', "seed"),
    ("chat", ', "seed": "7"', "seed"),
    ("chat", ', "seed": true', "seed"),
    ("chat", ', "max_tokens": 0', "max_tokens"),
    ("chat", ', "max_tokens": -3', "max_tokens"),
    ("chat", ', "max_tokens": 2.5', "max_tokens"),
    ("chat", ', "max_tokens": "5"', "max_tokens"),
    ("chat", ', "max_tokens": true', "max_tokens"),
    ("chat", f', "max_tokens": {10**30}', "max_tokens"),
    ("chat", ', "max_completion_tokens": 0', "max_completion_tokens"),
    ("chat", ', "max_tokens": "x", "max_completion_tokens": 5', "max_tokens"),
    ("chat", ', "top_k": -1', "top_k"),
    ("chat", f', "top_k": {10**30}', "top_k"),
    ("chat", ', "top_k": 2.5', "top_k"),
    ("chat", ', "n": 0', "n"),
    ("chat", ', "n": 2', "n"),
    ("chat", ', "n": 1.5', "n"),
    ("chat", ', "top_logprobs": 21', "top_logprobs"),
    # floats out of range or mistyped
    ("chat", ', "temperature": -0.1', "temperature"),
    ("chat", ', "temperature": 2.5', "temperature"),
    ("chat", ', "temperature": true', "temperature"),
    ("chat", ', "temperature": [1]', "temperature"),
    ("chat", ', "top_p": 1.5', "top_p"),
    ("chat", ', "top_p": -0.5', "top_p"),
    ("chat", ', "top_p": "x"', "top_p"),
    ("chat", ', "repetition_penalty": 0', "repetition_penalty"),
    ("chat", ', "repetition_penalty": 11', "repetition_penalty"),
    ("chat", ', "frequency_penalty": 3', "frequency_penalty"),
    # stream, stream_options, stop
    ("chat", ', "stream": "yes"', "stream"),
    ("chat", ', "stream": 1', "stream"),
    ("chat", ', "stream_options": {"include_usage": true}', "stream_options"),  # without stream
    ("chat", ', "stream": true, "stream_options": "x"', "stream_options"),
    ("chat", ', "stream": true, "stream_options": {"include_usage": "yes"}', "stream_options.include_usage"),
    ("chat", ', "stream": true, "stream_options": {"foo": 1}', "stream_options.foo"),
    ("chat", ', "stop": 5', "stop"),
    ("chat", ', "stop": ""', "stop"),
    ("chat", ', "stop": [""]', "stop"),
    ("chat", ', "stop": [1]', "stop"),
    ("chat", ', "stop": ["a", "b", "c", "d", "e"]', "stop"),
    # model and metadata-like fields
    ("chat", ', "model": 5', "model"),
    ("chat", ', "model": ""', "model"),
    ("chat", ', "model": null', "model"),
    ("chat", ', "user": 5', "user"),
    ("chat", ', "metadata": "x"', "metadata"),
    ("chat", ', "metadata": {"k": 1}', "metadata.k"),
    ("chat", ', "store": "yes"', "store"),
    ("chat", ', "service_tier": 1', "service_tier"),
    ("chat", ', "parallel_tool_calls": "x"', "parallel_tool_calls"),
    # features this server does not implement: refused, not silently ignored
    ("chat", ', "logit_bias": {"50": 10}', "logit_bias"),
    ("chat", ', "logit_bias": [1]', "logit_bias"),
    ("chat", ', "logprobs": true', "logprobs"),
    ("chat", ', "logprobs": "x"', "logprobs"),
    ("chat", ', "top_logprobs": 3', "top_logprobs"),
    ("chat", ', "frequency_penalty": 0.5', "frequency_penalty"),
    ("chat", ', "presence_penalty": -1', "presence_penalty"),
    ("chat", ', "tools": [{"type": "function", "function": {"name": "f"}}]', "tools"),
    ("chat", ', "tools": "x"', "tools"),
    ("chat", ', "tool_choice": "required"', "tool_choice"),
    ("chat", ', "tool_choice": {"type": "function", "function": {"name": "f"}}', "tool_choice"),
    ("chat", ', "functions": [{"name": "f"}]', "functions"),
    ("chat", ', "function_call": {"name": "f"}', "function_call"),
    ("chat", ', "response_format": {"type": "json_object"}', "response_format"),
    ("chat", ', "modalities": ["text", "audio"]', "modalities"),
    ("chat", ', "audio": {"voice": "alloy", "format": "wav"}', "audio"),
    ("chat", ', "prediction": {"type": "content", "content": "x"}', "prediction"),
    ("chat", ', "web_search_options": {}', "web_search_options"),
    ("chat", ', "reasoning_effort": "low"', "reasoning_effort"),
    ("chat", ', "verbosity": "low"', "verbosity"),
    ("chat", ', "min_p": 0.1', "min_p"),
    ("chat", ', "foo": 1', "foo"),
    ("chat", ', "prompt": "x"', "prompt"),  # a completions field
    # messages: shape, roles, content strings and content-part lists
    ("chat", ', "messages": []', "messages"),
    ("chat", ', "messages": "hi"', "messages"),
    ("chat", ', "messages": null', "messages"),
    ("chat", msgs("5"), "messages[0]"),
    ("chat", msgs('{"content": "x"}'), "messages[0].role"),
    ("chat", msgs('{"role": "robot", "content": "x"}'), "messages[0].role"),
    ("chat", msgs('{"role": 5, "content": "x"}'), "messages[0].role"),
    ("chat", msgs('{"role": ["user"], "content": "x"}'), "messages[0].role"),
    ("chat", msgs('{"role": "tool", "content": "x", "tool_call_id": "c1"}'), "messages[0].role"),
    ("chat", msgs('{"role": "function", "content": "x", "name": "f"}'), "messages[0].role"),
    ("chat", msgs('{"role": "user"}'), "messages[0].content"),
    ("chat", msgs(UA + "null" + UB), "messages[0].content"),
    ("chat", msgs(UA + "5" + UB), "messages[0].content"),
    ("chat", msgs(UA + '{"text": "x"}' + UB), "messages[0].content"),
    ("chat", msgs(UA + "[]" + UB), "messages[0].content"),
    ("chat", msgs(UA + '[5, "x"]' + UB), "messages[0].content[0]"),
    ("chat", msgs(UA + '["x"]' + UB), "messages[0].content[0]"),
    ("chat", msgs(UA + '[{"type": "text"}]' + UB), "messages[0].content[0].text"),
    ("chat", msgs(UA + '[{"type": "text", "text": 5}]' + UB), "messages[0].content[0].text"),
    ("chat", msgs(UA + '[{"text": "x"}]' + UB), "messages[0].content[0].type"),
    ("chat", msgs(UA + '[{"type": "video", "text": "x"}]' + UB), "messages[0].content[0].type"),
    ("chat", msgs(UA + '[{"type": "text", "text": "a", "extra": 1}]' + UB), "messages[0].content[0].extra"),
    ("chat", msgs(UA + '[{"type": "text", "text": "a"}, '
                  '{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]' + UB),
     "messages[0].content[1].type"),
    ("chat", msgs(UA + '[{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]' + UB),
     "messages[0].content[0].type"),
    ("chat", msgs(UA + '[{"type": "file", "file": {"file_id": "f"}}]' + UB), "messages[0].content[0].type"),
    ("chat", msgs('{"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]}', UA + '"x"' + UB),
     "messages[0].content[0].type"),
    ("chat", msgs(UA + '"x", "foo": 1' + UB), "messages[0].foo"),
    ("chat", msgs(UA + '"x", "name": 5' + UB), "messages[0].name"),
    ("chat", msgs('{"role": "system", "content": "x", "refusal": "no"}', UA + '"x"' + UB), "messages[0].refusal"),
    ("chat", msgs('{"role": "assistant", "content": null, "tool_calls": [{"id": "c", "type": "function", '
                  '"function": {"name": "f", "arguments": "{}"}}]}', UA + '"x"' + UB), "messages[0].tool_calls"),
    ("chat", msgs('{"role": "assistant", "content": "x", "refusal": 5}', UA + '"x"' + UB), "messages[0].refusal"),
    ("chat", msgs(UA + '"a\\ud800b"' + UB), "messages[0].content"),  # a lone surrogate
    # /v1/completions
    ("completions", ', "prompt": 5', "prompt"),
    ("completions", ', "prompt": null', "prompt"),
    ("completions", ', "prompt": []', "prompt"),
    ("completions", ', "prompt": [1, 2, 3]', "prompt"),
    ("completions", ', "prompt": [[1, 2]]', "prompt"),
    ("completions", ', "prompt": ["a", "b"]', "prompt"),
    ("completions", ', "prompt": [5, "x"]', "prompt"),
    ("completions", ', "prompt": "\\udc80"', "prompt"),
    ("completions", ', "echo": "yes"', "echo"),
    ("completions", ', "suffix": "tail"', "suffix"),
    ("completions", ', "suffix": 5', "suffix"),
    ("completions", ', "best_of": 2', "best_of"),
    ("completions", ', "best_of": 0', "best_of"),
    ("completions", ', "logprobs": 1', "logprobs"),
    ("completions", ', "logprobs": 0', "logprobs"),
    ("completions", ', "logprobs": 9', "logprobs"),
    ("completions", ', "logit_bias": {"50": -100}', "logit_bias"),
    ("completions", ', "n": 3', "n"),
    ("completions", ', "max_tokens": NaN', "max_tokens"),
    ("completions", ', "max_tokens": Infinity, "stream": true', "max_tokens"),
    ("completions", f', "seed": {2**70}', "seed"),
    ("completions", ', "temperature": NaN', "temperature"),
    ("completions", ', "top_p": NaN', "top_p"),
    ("completions", ', "stop": [5]', "stop"),
    ("completions", ', "stream_options": {"include_usage": true}', "stream_options"),
    ("completions", ', "messages": []', "messages"),  # a chat field
    ("completions", ', "max_completion_tokens": 5', "max_completion_tokens"),  # a chat field
]

# whole bodies that are not a standard JSON object: (endpoint, raw bytes)
BAD_BODIES = [
    ("chat", b"{not json"),
    ("chat", b"[1, 2]"),
    ("chat", b"NaN"),
    ("chat", b'"text"'),
    ("chat", b""),
    ("chat", b"\xff\xfe{}"),
    ("chat", b"[" * 100_000),
    ("chat", (CHAT % (', "seed": ' + "9" * 5000)).encode()),  # longer than Python's int-conversion limit
    ("completions", b"{"),
    ("completions", (COMP % ', "max_tokens": 1e999999').encode()),
]

# valid requests the checks must let through (fragments as above)
GOOD = [
    ("chat", ', "max_tokens": 5.0'),
    ("chat", ', "max_completion_tokens": 3, "max_tokens": null'),
    ("chat", f', "seed": {2**64 - 1}'),
    ("chat", f', "seed": {-2**63}'),
    ("chat", ', "seed": 0, "temperature": 0, "top_p": 1, "top_k": 0'),
    ("chat", ', "temperature": 2, "top_p": 0.5, "top_k": 5, "repetition_penalty": 1.2'),
    ("chat", ', "n": 1, "logprobs": false, "top_logprobs": 0, "logit_bias": {}, "frequency_penalty": 0, '
             '"presence_penalty": 0.0'),
    ("chat", ', "tools": [], "tool_choice": "none", "parallel_tool_calls": true, "response_format": {"type": "text"}, '
             '"modalities": ["text"], "audio": null, "reasoning_effort": null'),
    ("chat", ', "user": "u1", "metadata": {"k": "v"}, "store": false, "service_tier": "auto", '
             '"prompt_cache_key": "p", "safety_identifier": "s"'),
    ("chat", ', "stop": "x"'),
    ("chat", ', "stop": ["x", "yy", "zzz", "w"]'),
    ("chat", ', "stop": []'),
    ("chat", ', "stream": false'),
    ("chat", ', "stream": true, "stream_options": {"include_usage": true, "include_obfuscation": false}'),
    ("chat", msgs('{"role": "developer", "content": "be brief"}', '{"role": "system", "content": "ok", "name": "s"}',
                  UA + '[{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}], "name": "bob"' + UB,
                  '{"role": "assistant", "content": [{"type": "text", "text": "yes"}], "refusal": null, '
                  '"tool_calls": []}', UA + '"again \\u4e16\\ud83d\\ude42"' + UB)),
    ("completions", ', "prompt": ["one"], "echo": true, "suffix": "", "best_of": 1, "logprobs": null'),
    ("completions", ', "max_tokens": 4, "stop": "c", "stream": true, "stream_options": {"include_usage": false}'),
]


@pytest.fixture(scope="module")
def url():
    with running(create_app(FakeEngine(max_seq_len=256))) as u:
        yield u


def _post(url, endpoint, raw: bytes):
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    return httpx.post(url + path, content=raw, headers={"Content-Type": "application/json"}, timeout=10)


def _is_400(r, param="<any>"):
    assert r.status_code == 400, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json"), r.headers["content-type"]
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"}, e
    assert e["type"] == "invalid_request_error" and isinstance(e["message"], str) and e["message"], e
    if param != "<any>":
        assert e["param"] == param, e
    return e


@pytest.mark.parametrize("endpoint,frag,param", BAD, ids=[f"{e}:{f.strip(', ')[:60]}" for e, f, _ in BAD])
def test_bad_field_is_400(url, endpoint, frag, param):
    raw = (CHAT if endpoint == "chat" else COMP) % frag
    _is_400(_post(url, endpoint, raw.encode()), param)


@pytest.mark.parametrize("endpoint,raw", BAD_BODIES, ids=[f"{e}:{r[:20]!r}" for e, r in BAD_BODIES])
def test_bad_body_is_400(url, endpoint, raw):
    _is_400(_post(url, endpoint, raw))


@pytest.mark.parametrize("endpoint,frag", GOOD, ids=[f"{e}:{f.strip(', ')[:60]}" for e, f in GOOD])
def test_valid_request_is_served(url, endpoint, frag):
    raw = (CHAT if endpoint == "chat" else COMP) % frag
    r = _post(url, endpoint, raw.encode())
    assert r.status_code == 200, r.text[:300]
    if r.headers["content-type"].startswith("text/event-stream"):
        lines = [ln for ln in r.text.splitlines() if ln]
        assert lines[-1] == "data: [DONE]" and not any('"error"' in ln for ln in lines)
    else:
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_developer_and_parts_reach_the_model(url):
    """Content parts are joined, developer is a system turn: what the engine sees, not just a 200."""
    eng = FakeEngine(max_seq_len=256, reply="")
    with running(create_app(eng)) as u:
        seen = []
        orig = eng.encode_chat
        eng.encode_chat = lambda m: seen.append(m) or orig(m)
        raw = CHAT % msgs('{"role": "developer", "content": "d"}',
                          UA + '[{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]' + UB)
        assert _post(u, "chat", raw.encode()).status_code == 200
    assert seen == [[{"role": "system", "content": "d"}, {"role": "user", "content": "hello"}]]


def test_official_client_gets_bad_request(url):
    """What the official client can send (it refuses to encode NaN itself) comes back as
    openai.BadRequestError with the offending param."""
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", timeout=10, max_retries=0)
    m = [{"role": "user", "content": "hi"}]
    cases = [
        (dict(messages=m, seed=2**70), "seed"),
        (dict(messages=m, seed=2**70, stream=True), "seed"),
        (dict(messages=[{"role": "user", "content": [5, "x"]}]), "messages[0].content[0]"),
        (dict(messages=m, max_tokens=1e300), "max_tokens"),
        (dict(messages=m, n=2), "n"),
        (dict(messages=m, logprobs=True, top_logprobs=2), "logprobs"),
        (dict(messages=m, logit_bias={"5": 3}), "logit_bias"),
        (dict(messages=m, extra_body={"min_p": 0.05}), "min_p"),
    ]
    for kw, param in cases:
        with pytest.raises(openai.BadRequestError) as ei:
            c.chat.completions.create(model="fake", **kw)
        assert ei.value.status_code == 400 and ei.value.body["param"] == param, (kw, ei.value.body)
    with pytest.raises(openai.BadRequestError) as ei:
        c.completions.create(model="fake", prompt=[1, 2, 3])
    assert ei.value.body["param"] == "prompt"


class BrokenEngine(FakeEngine):
    """Fails after `after` tokens (a model or kernel error in the middle of decoding); with
    `encode_fails`, fails before generation starts (a bug of ours in front of the model)."""

    def __init__(self, after=3, encode_fails=False):
        super().__init__(reply="abcdefgh", max_seq_len=256)
        self.after, self.encode_fails = after, encode_fails

    def encode_chat(self, messages):
        if self.encode_fails:
            raise KeyError("broken template")
        return super().encode_chat(messages)

    def generate(self, prompt_ids, params):
        for i, t in enumerate(super().generate(prompt_ids, params)):
            if i == self.after:
                raise RuntimeError("kernel failed")
            yield t


def test_stream_that_fails_after_headers_ends_with_error_and_done():
    with running(create_app(BrokenEngine(after=3))) as u:
        with httpx.stream("POST", u + "/v1/chat/completions", timeout=10,
                          json={"model": "fake", "messages": [{"role": "user", "content": "x"}], "stream": True}) as r:
            assert r.status_code == 200
            lines = [ln for ln in r.iter_lines() if ln]
        assert lines[-1] == "data: [DONE]", lines
        err = json.loads(lines[-2][6:])["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "server_error"
        assert "kernel failed" in err["message"]
        text = "".join(json.loads(ln[6:])["choices"][0]["delta"].get("content", "") for ln in lines[:-2])
        assert text == "abc"  # what was generated before the failure was delivered
        # the official client surfaces the error event as an exception instead of a silent end
        c = openai.OpenAI(base_url=u + "/v1", api_key="x", timeout=10, max_retries=0)
        with pytest.raises(openai.APIError, match="kernel failed"):
            for _ in c.chat.completions.create(model="fake", messages=[{"role": "user", "content": "x"}],
                                               stream=True):
                pass
        # completions streams end the same way
        r = httpx.post(u + "/v1/completions", json={"model": "fake", "prompt": "x", "stream": True}, timeout=10)
        lines = [ln for ln in r.text.splitlines() if ln]
        assert lines[-1] == "data: [DONE]" and "kernel failed" in json.loads(lines[-2][6:])["error"]["message"]
        # non-streaming: a JSON 500 in the same shape
        r = httpx.post(u + "/v1/chat/completions", timeout=10,
                       json={"model": "fake", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"


def test_internal_error_is_json_500():
    with running(create_app(BrokenEngine(encode_fails=True))) as u:
        r = httpx.post(u + "/v1/chat/completions", timeout=10,
                       json={"model": "fake", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 500 and r.headers["content-type"].startswith("application/json"), r.text[:200]
        e = r.json()["error"]
        assert set(e) == {"message", "type", "param", "code"} and e["type"] == "server_error"
        assert "broken template" not in e["message"]  # no internals leak to the client
        assert httpx.get(u + "/health", timeout=5).status_code == 200
