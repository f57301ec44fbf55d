"""The server over a real tiny llmcore model (`ModelEngine`, KV-cache generation, the real byte-level
tokenizer), not the fake: greedy answers through the official client equal llmcore.model.generate's,
also when several requests interleave on the worker; seeded sampling follows softmax(logits / T) and
stays per request under concurrency; stop strings, whole UTF-8 characters in streams and
disconnect-cancels-generation on the real engine (a model memorized in a fixture makes the answer
known); the request checks in front of the real sampler (seeds, tiny temperatures, top_p = 0); and
scripts/serve.py starts from a checkpoint and answers on 127.0.0.1."""
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

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
    live = _counting(eng)
    with running(create_app(eng)) as url:
        yield url, model, tok, live


def _greedy(model, tok, messages, n):
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    out = generate(model, [ids], max_new_tokens=n, temperature=0, stop_tokens=(tok.eos_id,))[0]
    return tok.decode(out, skip_special_tokens=True), len(ids), len(out)


def test_chat_greedy_matches_generate(served):
    url, model, tok, _ = served
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
    url, model, tok, _ = served
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


def _counting(eng):
    """Wraps eng.generate to count generations open at once (shows requests really interleaved)."""
    state = dict(live=0, peak=0)
    orig = eng.generate

    def generate(prompt_ids, params):
        state["live"] += 1
        state["peak"] = max(state["peak"], state["live"])
        try:
            yield from orig(prompt_ids, params)
        finally:
            state["live"] -= 1

    eng.generate = generate
    return state


def test_seeded_sampling_is_per_request_under_concurrency(served):
    """Six seeded, sampled (T = 1) requests streamed at once give exactly what each gives alone, and
    they really were decoding at the same time: every request samples from its own generator and
    keeps its own KV cache, however the worker interleaves them."""
    url, model, tok, live = served
    c = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=60, max_retries=0)
    kw = dict(model="tiny", max_tokens=12, temperature=1.0, extra_body={"top_k": 50})
    prompts = [[{"role": "user", "content": f"tell me {i}"}] for i in range(6)]
    alone = [c.chat.completions.create(messages=m, seed=100 + i, **kw).choices[0].message.content
             for i, m in enumerate(prompts)]
    assert len(set(alone)) == len(alone) and all(alone)
    # the same prompt with different seeds at T = 1 differs (an always-greedy sampler gives one answer)
    same = {c.chat.completions.create(messages=prompts[0], seed=s, **kw).choices[0].message.content for s in range(6)}
    assert len(same) >= 4, same

    async def main():
        ac = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", timeout=60, max_retries=0)

        async def one(i, m):
            s = await ac.chat.completions.create(messages=m, seed=100 + i, stream=True, **kw)
            return "".join([ch.choices[0].delta.content or "" async for ch in s if ch.choices])

        return await asyncio.wait_for(asyncio.gather(*(one(i, m) for i, m in enumerate(prompts))), 120)

    live["peak"] = 0
    assert asyncio.run(main()) == alone
    assert live["peak"] >= 4, live  # interleaved on the worker, not one after another


def _first_token_bins(tok, probs):
    """Expected probability of each one-token completion text: tokens that decode alike (partial
    UTF-8 bytes -> U+FFFD, special tokens and the stop token -> "") share a bin."""
    bins = {}
    for i, p in enumerate(probs.tolist()):
        t = tok.decode([i], skip_special_tokens=True)
        bins[t] = bins.get(t, 0.0) + p
    return bins


def _chi2_pvalue(counts, bins, n):
    """Chi-square goodness of fit of observed text counts to expected bin probabilities; bins with an
    expected count below 5 are pooled. A sample in a zero-probability bin fails at once."""
    from scipy.stats import chisquare

    for t in counts:
        assert bins.get(t, 0.0) > 0, f"sampled {t!r}, which has probability 0"
    big = [t for t, p in bins.items() if p * n >= 5]
    obs = [counts.get(t, 0) for t in big]
    exp = [bins[t] * n for t in big]
    rest_obs, rest_exp = n - sum(obs), n - sum(exp)
    if rest_exp >= 1:
        obs.append(rest_obs)
        exp.append(rest_exp)
    scale = sum(obs) / sum(exp)
    return chisquare(obs, [e * scale for e in exp]).pvalue


@pytest.mark.parametrize("temperature,top_k,n", [(1.0, 0, 200), (0.6, 0, 200), (1.5, 6, 120)])
def test_sampled_tokens_follow_softmax(served, temperature, top_k, n):
    """The first sampled token over n seeded requests through the server follows softmax(logits / T)
    restricted to the top-k (chi-square); and the test can tell temperatures apart: the same counts
    are rejected against the T = 1 distribution (T != 1) or the T = 0.6 one (T = 1). An always-greedy
    sampler, one that ignores temperature or top_k, fails here."""
    url, model, tok, _ = served
    ids = tok.encode("The capital")
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, -1].double()

    def dist(t, k):
        z = logits / t
        if k:
            z = z.masked_fill(z < z.topk(k).values[-1], float("-inf"))
        return _first_token_bins(tok, z.softmax(-1))

    counts = {}
    with httpx.Client(base_url=url, timeout=30) as h:
        for seed in range(n):
            r = h.post("/v1/completions", json=dict(model="tiny", prompt="The capital", max_tokens=1, seed=seed,
                                                   temperature=temperature, top_k=top_k))
            assert r.status_code == 200, r.text
            t = r.json()["choices"][0]["text"]
            counts[t] = counts.get(t, 0) + 1
    assert len(counts) >= (3 if top_k else 10), counts  # different seeds give different tokens
    assert _chi2_pvalue(counts, dist(temperature, top_k), n) > 1e-3
    other = 1.0 if temperature != 1.0 else 0.6
    if not top_k:  # power: the other temperature's distribution is rejected
        assert _chi2_pvalue(counts, dist(other, 0), n) < 1e-6


def test_sampler_edge_values_on_real_engine(served):
    """Values at the edges of what the API allows reach the real sampler without a 500: seeds over
    torch's whole range, temperatures too small to divide by (greedy), top_p = 0 (greedy); a seed
    torch cannot take is a 400 before any token, also when streaming."""
    url, model, tok, _ = served
    msgs = [{"role": "user", "content": "hi"}]
    want, _, _ = _greedy(model, tok, msgs, 6)
    with httpx.Client(base_url=url, timeout=30) as h:
        def post(stream=False, **kw):
            return h.post("/v1/chat/completions", json=dict(model="tiny", messages=msgs, max_tokens=6, stream=stream,
                                                            **kw))

        for kw in (dict(temperature=1e-300, seed=1), dict(temperature=1e-6), dict(top_p=0.0, seed=1),
                   dict(top_p=1e-300, temperature=2.0)):
            r = post(**kw)
            assert r.status_code == 200, (kw, r.text)
            assert r.json()["choices"][0]["message"]["content"] == want, kw
            lines = [ln for ln in post(stream=True, **kw).text.splitlines() if ln]
            assert lines[-1] == "data: [DONE]" and not any('"error"' in ln for ln in lines), (kw, lines[-2:])
        for seed in (2**64 - 1, -2**63, 0):
            assert post(seed=seed, temperature=1.0).status_code == 200
        for stream in (False, True):
            r = post(stream=stream, seed=2**70)
            assert r.status_code == 400 and r.json()["error"]["param"] == "seed", r.text


# ---- a model that knows its answers: stop strings and UTF-8 on the real engine
# each answer holds characters the tokenizer splits into byte tokens (🙂 4, 龘 3, ü/ï/ö/é 2)
ANSWERS = {"say it": "Hello 🙂 world; 龘 STOP here, ünï 世界 done.",
           "again": "Ünïcödé: 龘龘 and 🙂🙂, then STOP."}


@pytest.fixture(scope="module")
def memorized(tok):
    """A tiny model trained (80 Adam steps, a few seconds) until its greedy answers to ANSWERS' prompts
    are exactly ANSWERS, then served by the real ModelEngine."""
    from llmcore.model.generate import generate as gen

    seqs = []
    for q, a in ANSWERS.items():
        seqs.append((tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True),
                     tok.encode(a) + [tok.eos_id]))
    model = tiny_model(tok.vocab_size, seed=0).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    L = max(len(p) + len(a) for p, a in seqs)
    x = torch.zeros(len(seqs), L, dtype=torch.long)
    y = torch.full((len(seqs), L), -100)
    for i, (p, a) in enumerate(seqs):
        x[i, :len(p) + len(a)] = torch.tensor(p + a)
        y[i, len(p) - 1:len(p) + len(a) - 1] = torch.tensor(a)
    for _ in range(80):
        _, loss = model(x, labels=y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for p, a in seqs:
        assert gen(model, [p], max_new_tokens=len(a) + 4, temperature=0, stop_tokens=(tok.eos_id,))[0] == a[:-1]
    # the answers really split characters across tokens (what the UTF-8 test is about)
    assert any("\ufffd" in tok.decode([t]) for _, a in seqs for t in a)
    eng = ModelEngine(model, tok, model_id="tiny")
    with running(create_app(eng)) as url:
        yield url, eng


def _ask(c, q, stream, **kw):
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": q}], temperature=0,
                                  max_tokens=60, stream=stream, **({"stream_options": {"include_usage": True}}
                                                                   if stream else {}), **kw)
    if not stream:
        return [r.choices[0].message.content], r.choices[0].finish_reason, r.usage.completion_tokens
    parts, finish, usage = [], None, None
    for ch in r:
        usage = ch.usage or usage
        for x in ch.choices:
            if x.delta.content:
                parts.append(x.delta.content)
            finish = x.finish_reason or finish
    return parts, finish, usage.completion_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_real_engine_streams_whole_utf8_characters(memorized, tok, stream):
    """Streamed deltas are whole characters: none holds U+FFFD though the answer's emoji and rare CJK
    arrive as several byte tokens, and together they are the answer."""
    url, _ = memorized
    c = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=60, max_retries=0)
    for q, a in ANSWERS.items():
        parts, finish, n = _ask(c, q, stream)
        assert not any("\ufffd" in p for p in parts), parts
        assert "".join(parts) == a and finish == "stop" and n == len(tok.encode(a))
        if stream:
            assert len(parts) > 10  # streamed piece by piece, not held back to the end


STOPS = [  # (question, stop, expected content)
    ("say it", "STOP", "Hello 🙂 world; 龘 "),
    ("say it", ["zzz", "here"], "Hello 🙂 world; 龘 STOP "),
    ("say it", "ld; 龘", "Hello 🙂 wor"),  # spans five tokens, ends inside a byte-split character
    ("say it", "🙂", "Hello "),  # one character of four byte tokens
    ("say it", "é", "Hello 🙂 world; 龘 STOP here, ünï 世界 done."),  # never occurs: the answer ends at eos
    ("again", "龘 and", "Ünïcödé: 龘"),
    ("again", "S", "Ünïcödé: 龘龘 and 🙂🙂, then "),
]


@pytest.mark.parametrize("stream", [False, True])
def test_real_engine_stop_strings(memorized, tok, stream):
    """Stop strings cut the real model's answer before the stop string (also one that spans tokens or
    a byte-split character), end it with finish_reason 'stop', and stop the generation there (usage
    counts only the tokens up to the stop string)."""
    url, _ = memorized
    c = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=60, max_retries=0)
    for q, stop, want in STOPS:
        parts, finish, n = _ask(c, q, stream, stop=stop)
        assert "".join(parts) == want and finish == "stop", (stop, parts)
        full = ANSWERS[q]
        if want != full:  # stopped early: fewer tokens than the whole answer
            assert n < len(tok.encode(full)), (stop, n)


@pytest.mark.parametrize("stream", [True, False])
def test_real_engine_disconnect_cancels_generation(tok, stream):
    """A client that goes away mid-answer stops the real model's decoding within moments: the
    scheduler drops the request and frees its KV cache, long before the 19000 tokens it asked for."""
    model = tiny_model(tok.vocab_size, seed=7, init_std=0.3)
    eng = ModelEngine(model, tok, model_id="tiny", max_seq_len=20000, stop_ids=())  # no stop token: endless
    live = _counting(eng)
    app = create_app(eng)
    sched = app.state.scheduler
    body = {"model": "tiny", "messages": [{"role": "user", "content": "go"}], "max_tokens": 19000, "stream": stream}
    with running(app) as url:
        if stream:
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
                got = 0
                for line in r.iter_lines():
                    got += line.startswith("data: ")
                    if got >= 10:
                        break
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url + "/v1/chat/completions", json=body, timeout=1.0)
        deadline = time.monotonic() + 8
        while (sched.num_running() or live["live"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sched.num_running() == 0 and live["live"] == 0, sched.stats
        n = sched.stats["tokens"]
        time.sleep(0.3)
        assert sched.stats["tokens"] == n < 15000 and sched.stats["cancelled"] == 1, sched.stats


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
