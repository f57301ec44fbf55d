"""Model tests: llmcore backend == torch backend, packed documents isolated, KV-cache generation ==
full recomputation, sampling rules, parameter names, MoE."""
import pytest
import torch

from llmcore.model import KVCache, Transformer, get_config
from llmcore.model.generate import generate, sample_next, stream, stream_text
from tests.conftest import assert_close

# small but with the real head_dim (64) the kernels are built for
SMALL = dict(dim=128, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=512, max_seq_len=128)


def pair(seed=0, **kw):
    """The same weights in both backends (QK-norm weights drawn away from their all-ones init)."""
    torch.manual_seed(seed)
    a = Transformer(get_config("tiny", **{**SMALL, **kw}))
    b = Transformer(get_config("tiny", **{**SMALL, **kw, "backend": "torch"}))
    with torch.no_grad():
        for n, p in a.named_parameters():
            if n.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    b.load_state_dict(a.state_dict())
    return a, b


def test_presets():
    c = get_config("minimind-26m")
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.ffn_hidden) == (512, 8, 8, 2, 6400, 1408)
    assert get_config("minimind-104m").ffn_hidden == 2048
    m = get_config("minimind-moe")
    assert (m.dim, m.n_experts, m.n_shared_experts, m.top_k) == (640, 4, 1, 2)
    with pytest.raises(ValueError, match="preset"):
        get_config("nope")
    with pytest.raises(ValueError, match="n_heads"):
        get_config("tiny", n_heads=3)


def test_parameter_names_and_tied_head():
    a, _ = pair()
    names = set(a.state_dict())
    for i in range(2):
        for n in ("attn_norm.weight", "attn.wq.weight", "attn.wk.weight", "attn.wv.weight", "attn.wo.weight",
                  "mlp_norm.weight", "mlp.w_gate.weight", "mlp.w_up.weight", "mlp.w_down.weight"):
            assert f"layers.{i}.{n}" in names
    assert {"embed.weight", "norm.weight"} <= names
    assert not any("lm_head" in n for n in names) and a.lm_head is a.embed.weight
    assert not any("bias" in n for n in names)


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_backends_match_fp32(packed, qk_norm):
    """qk_norm=True: the llmcore backend runs the fused qk_norm_rope, the torch backend F.rms_norm +
    manual RoPE."""
    a, b = pair(qk_norm=qk_norm)
    ids = torch.randint(0, 512, (2, 48))
    labels = torch.randint(0, 512, (2, 48))
    labels[:, :5] = -100
    pos = None
    if packed:
        pos = torch.cat([torch.arange(17), torch.arange(31)]).repeat(2, 1)
        pos[1] = torch.cat([torch.arange(5, 30), torch.arange(23)])  # a row starting mid-document
    la, lossa = a(ids, positions=pos, labels=labels)
    lb, lossb = b(ids, positions=pos, labels=labels)
    assert la is None  # fused_ce (the default): the llmcore loss never materializes the logits
    assert_close(a(ids, positions=pos).detach(), lb.detach(), name="logits")
    lossa.backward()
    lossb.backward()
    assert abs(lossa.item() - lossb.item()) < 1e-5
    gb = dict(b.named_parameters())
    for n, p in a.named_parameters():
        torch.testing.assert_close(p.grad, gb[n].grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"grad {n}: {m}")


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_ce_matches_unfused(autocast):
    """fused_ce=True (fused_linear_cross_entropy) vs False (logits + F.cross_entropy): the same loss
    and parameter gradients, in fp32 and under bf16 autocast (within the bf16 head's rounding)."""
    torch.manual_seed(0)
    a = Transformer(get_config("tiny", **SMALL))
    b = Transformer(get_config("tiny", **SMALL, fused_ce=False))
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 512, (2, 40))
    labels = torch.randint(0, 512, (2, 40))
    labels[:, :7] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        la, lossa = a(ids, labels=labels)
        lb, lossb = b(ids, labels=labels)
    assert la is None and lb is not None and lossa.dtype == torch.float32
    lossa.backward()
    lossb.backward()
    tol = dict(atol=2e-2, rtol=2e-2) if autocast else dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lossa, lossb, **tol)
    gb = dict(b.named_parameters())
    for n, p in a.named_parameters():
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, gb[n].grad, **tol, msg=lambda m: f"grad {n}: {m}")
    # all-ignored labels: loss 0 and zero gradients (F.cross_entropy's mean would be NaN)
    a.zero_grad()
    _, loss0 = a(ids, labels=torch.full_like(labels, -100))
    loss0.backward()
    assert loss0.item() == 0.0 and all((p.grad == 0).all() for p in a.parameters() if p.grad is not None)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_backends_match_bf16_autocast(qk_norm):
    a, b = pair(qk_norm=qk_norm)
    ids = torch.randint(0, 512, (2, 64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        la, lb = a(ids), b(ids)
    ref = b.float()(ids)
    err_a, err_b = (la.float() - ref).abs().max().item(), (lb.float() - ref).abs().max().item()
    assert err_a <= 2 * err_b + 1e-2, (err_a, err_b)


@pytest.mark.parametrize("backend", ["llmcore", "torch"])
def test_packed_documents_do_not_attend_across(backend):
    torch.manual_seed(0)
    m = Transformer(get_config("tiny", **SMALL, backend=backend))
    d1, d2 = torch.randint(0, 512, (1, 20)), torch.randint(0, 512, (1, 12))
    packed = torch.cat([d1, d2], 1)
    pos = torch.cat([torch.arange(20), torch.arange(12)])[None]
    out = m(packed, positions=pos)
    torch.testing.assert_close(out[:, :20], m(d1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 20:], m(d2), atol=1e-5, rtol=1e-5)


def full_recompute_greedy(m, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(m(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("backend", ["llmcore", "torch"])
def test_kv_cache_generation_equals_full_recompute(backend):
    torch.manual_seed(0)
    m = Transformer(get_config("tiny", **SMALL, backend=backend, init_std=0.3)).eval()  # wide init: varied tokens
    prompts = [[3, 14, 15, 92, 65, 35], [8, 9, 7, 9, 3, 2]]
    got = generate(m, prompts, 24, temperature=0)
    for p, g in zip(prompts, got):
        want = full_recompute_greedy(m, p, 24)
        assert g == want
    assert len(set(got[0])) > 3, "degenerate test: the model repeats one token"
    assert list(stream(m, prompts[0], 24, temperature=0)) == got[0]
    # unequal prompt lengths (one at a time) agree too
    assert generate(m, [prompts[0], prompts[1][:4]], 10, temperature=0)[0] == got[0][:10]


def test_qk_norm_model_uses_the_fused_op_and_decodes(monkeypatch):
    """With qk_norm on the llmcore backend every attention layer calls qk_norm_rope once per forward
    (training, prefill and each decode step), and KV-cache greedy decoding equals full recomputation."""
    import llmcore.nn.attention as attn

    calls = []
    real = attn.qk_norm_rope
    monkeypatch.setattr(attn, "qk_norm_rope", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    m = Transformer(get_config("tiny", **SMALL, qk_norm=True, init_std=0.3)).eval()
    m(torch.randint(0, 512, (1, 9)))
    assert len(calls) == SMALL["n_layers"]
    prompt = [3, 14, 15, 92, 65, 35]
    got = generate(m, [prompt], 12, temperature=0)[0]
    assert got == full_recompute_greedy(m, prompt, 12)
    assert len(set(got)) > 3, "degenerate test: the model repeats one token"


def test_generation_beyond_max_seq_len_and_stop_tokens():
    torch.manual_seed(0)
    m = Transformer(get_config("tiny", **{**SMALL, "max_seq_len": 16}, init_std=0.3)).eval()
    prompt = list(range(1, 13))
    g = generate(m, [prompt], 20, temperature=0)[0]
    assert g == full_recompute_greedy(m, prompt, 20)
    stop = g[5]
    cut = generate(m, [prompt], 20, temperature=0, stop_tokens=(stop,))[0]
    assert cut == g[:g.index(stop)]


def test_sampling_rules():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    greedy = logits.argmax(-1)
    assert torch.equal(sample_next(logits, temperature=0), greedy)
    assert torch.equal(sample_next(logits, temperature=1.0, top_k=1), greedy)
    assert torch.equal(sample_next(logits, temperature=1.0, top_p=1e-6), greedy)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, temperature=1.0, top_k=3, generator=g) for _ in range(200)])
    top3 = logits.topk(3, -1).indices
    assert all(bool(torch.isin(draws[:, r], top3[r]).all()) for r in range(4))
    # repetition penalty: a strongly penalized greedy token is no longer chosen
    seen = greedy[:, None]
    pen = sample_next(logits, seen, temperature=0, repetition_penalty=1e6)
    assert not bool((pen == greedy).any())


# A fixed logit vector for the sampler's distribution tests: a spread of 12 values (some tied).
_LOGITS = torch.tensor([2.0, 1.5, 1.5, 1.0, 0.7, 0.3, 0.0, -0.2, -0.5, -1.0, -1.5, -3.0], dtype=torch.float64)


def _restricted_softmax(logits, temperature, top_k=0, top_p=1.0):
    """fp64 reference written independently of sample_next: softmax(logits / T) over the top-k
    (ties at the k-th value kept), then the smallest most-likely-first prefix whose mass reaches top_p."""
    p = (logits / temperature).softmax(-1)
    keep = torch.ones_like(p, dtype=torch.bool)
    if top_k:
        keep &= logits >= logits.sort(descending=True).values[top_k - 1]
    p = torch.where(keep, p, 0.0)
    p = p / p.sum()
    if top_p < 1.0:
        order = p.argsort(descending=True, stable=True)
        kept, mass = [], 0.0
        for i in order.tolist():
            kept.append(i)
            mass += float(p[i])
            if mass >= top_p:
                break
        mask = torch.zeros_like(keep)
        mask[kept] = True
        p = torch.where(mask, p, 0.0)
        p = p / p.sum()
    return p


def _draw_counts(n, seed=0, **kw):
    """Counts of n draws of sample_next on _LOGITS (one batch row of n copies, seeded)."""
    g = torch.Generator().manual_seed(seed)
    ids = sample_next(_LOGITS.float().expand(n, -1), generator=g, **kw)
    return torch.bincount(ids, minlength=len(_LOGITS)).double()


def _chi2_p(counts, probs):
    """Chi-square goodness-of-fit p-value; any draw of a zero-probability token fails at once."""
    from scipy.stats import chisquare

    assert counts[probs == 0].sum() == 0, f"drew a token of probability 0: {counts.tolist()}"
    n = counts.sum()
    keep = probs * n >= 5
    obs, exp = counts[keep].tolist(), (probs[keep] * n).tolist()
    rest_o, rest_e = float(n - sum(obs)), float(n - sum(exp))
    if rest_e >= 1:
        obs.append(rest_o)
        exp.append(rest_e)
    exp = [e * sum(obs) / sum(exp) for e in exp]
    return chisquare(obs, exp).pvalue


N_DRAWS = 20000


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.5, 0, 1.0), (2.0, 0, 1.0), (1.0, 4, 1.0),
                                                     (1.5, 5, 1.0), (1.0, 0, 0.8), (0.7, 0, 0.6), (1.2, 6, 0.9)])
def test_sampled_frequencies_follow_restricted_softmax(temperature, top_k, top_p):
    """Frequencies of 20000 draws match softmax(logits / T) restricted to top-k / top-p (chi-square,
    p > 1e-4), and the same counts reject the distribution of another temperature (p < 1e-10): a
    sampler that ignores T, top_k or top_p, or always answers greedily, fails."""
    counts = _draw_counts(N_DRAWS, temperature=temperature, top_k=top_k, top_p=top_p)
    want = _restricted_softmax(_LOGITS, temperature, top_k, top_p)
    assert _chi2_p(counts, want) > 1e-4, (counts.tolist(), (want * N_DRAWS).tolist())
    other = _restricted_softmax(_LOGITS, temperature * 1.5, top_k, top_p)
    assert _chi2_p(counts, other) < 1e-10


def test_sampling_seeds_and_temperature():
    """Different seeds draw different sequences at T = 1; the same seed the same one; a higher
    temperature spreads the draws (more distinct tokens, a less frequent top token)."""
    a, b = (_draw_counts(1, s, temperature=1.0) for s in (0, 0))
    assert torch.equal(a, b)
    seqs = [tuple(sample_next(_LOGITS.float().expand(64, -1), temperature=1.0,
                              generator=torch.Generator().manual_seed(s)).tolist()) for s in range(4)]
    assert len(set(seqs)) == 4
    cold, hot = _draw_counts(4000, temperature=0.3), _draw_counts(4000, temperature=3.0)
    assert cold[0] > hot[0] + 1000 and (hot > 0).sum() > (cold > 0).sum()


class _ByteTok:
    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_stream_text_holds_back_partial_utf8(monkeypatch):
    import llmcore.model.generate as gen

    seq = list("é猫".encode())  # 2 + 3 bytes
    monkeypatch.setattr(gen, "stream", lambda *a, **k: iter(seq))
    pieces = list(stream_text(None, _ByteTok(), [1]))
    assert "".join(pieces) == "é猫" and "\ufffd" not in "".join(pieces)


def test_kv_cache_object():
    c = get_config("tiny", **SMALL)
    cache = KVCache(c, 2, 10)
    assert cache.k[0].shape == (2, 10, 1, 64) and cache.seqlens.dtype == torch.int32
    cache.advance(3)
    assert cache.seqlens.tolist() == [3, 3]
    with pytest.raises(ValueError, match="rows"):
        cache.rows(1, 3)


def test_kv_cache_rows_prefill_then_batched_decode_matches_one_at_a_time():
    """Prompts of different lengths prefilled into their own rows (cache.rows), then decoded in
    one batched forward per step at their own seqlens, give the logits of each prompt alone."""
    torch.manual_seed(0)
    m = Transformer(get_config("tiny", **SMALL)).eval()
    prompts = [torch.randint(0, 512, (1, n)) for n in (5, 11, 2)]
    nxt = torch.randint(0, 512, (3, 1))
    with torch.no_grad():
        cache = KVCache(m.cfg, 3, 16)
        for i, p in enumerate(prompts):
            view = cache.rows(i, i + 1)
            m(p, cache=view)
            view.advance(p.shape[1])
        assert cache.seqlens.tolist() == [5, 11, 2]
        batched = m(nxt, cache=cache)[:, -1]
        for i, p in enumerate(prompts):
            alone = m(torch.cat((p, nxt[i:i + 1]), 1))[:, -1]
            torch.testing.assert_close(batched[i:i + 1], alone, atol=2e-5, rtol=1e-4)


def test_moe_model_trains_and_reports_aux_loss():
    """An MoE model learns (loss on a repeating sequence falls by more than half in 40 AdamW steps);
    its aux loss is positive; the router gets a gradient from the aux loss alone and from the LM
    loss alone (through the combine weights); every routed and shared expert weight gets one."""
    torch.manual_seed(0)
    m = Transformer(get_config("tiny", **SMALL, n_experts=4, n_shared_experts=1, top_k=2))
    seq = torch.randint(0, 512, (2, 8)).repeat(1, 5)[:, :33]  # a pattern of 8 repeated
    ids, labels = seq[:, :-1], seq[:, 1:]  # (2, 32) next-token prediction
    _, loss = m(ids, labels=labels)
    aux = m.aux_loss()
    assert aux is not None and aux.item() > 0
    aux.backward()
    g = m.layers[0].mlp.gate.weight.grad
    assert g is not None and g.abs().sum() > 0, "the aux loss must reach the router"
    m.zero_grad(set_to_none=True)
    logits = m(ids)  # the LM loss alone reaches the router too, through the combine weights
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()
    assert m.layers[0].mlp.gate.weight.grad.abs().sum() > 0, "the LM loss must reach the router"
    m.zero_grad(set_to_none=True)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        _, loss = m(ids, labels=labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:
            for n, p in m.named_parameters():
                if "mlp" in n:
                    assert p.grad is not None and p.grad.abs().sum() > 0, n
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::8]


def test_flops_per_token_is_about_6n():
    m = Transformer(get_config("minimind-26m"))
    f = m.flops_per_token(512)
    assert 6 * m.num_params() <= f <= 6 * m.num_params() * 1.3
