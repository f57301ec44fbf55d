"""flash_attn / flash_attn_varlen / flash_attn_with_kvcache against the fp32 references
(tests/conftest.py's tolerance rule: fp32 tight; bf16/fp16 within 2x PyTorch's own low-precision
error of the same math). The CUDA cases (DEVICES) run on a GPU machine (scripts/gpu_check.sh).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import llmcore.ops as lo
from llmcore.ops.flash_attn import _attention_bhsd
from tests.conftest import DEVICES, DTYPES, assert_close, make

# (B, Sq, Sk, Hq, Hkv, D): Sq == Sk and Sq < Sk (bottom-right causal), Sq > Sk (fully masked
# causal rows), GQA ratios 1/2/4/8, lengths 1, 17, 127, 128, 129, 1000 (not tile multiples).
SHAPES = [
    (1, 1, 1, 2, 1, 64),
    (2, 17, 17, 4, 2, 64),
    (1, 127, 127, 8, 1, 64),
    (1, 128, 128, 2, 2, 128),
    (1, 129, 129, 4, 1, 96),
    (1, 1000, 1000, 2, 1, 64),
    (2, 17, 129, 8, 2, 128),
    (1, 1, 1000, 8, 8, 64),
    (1, 40, 17, 2, 1, 64),
]
GRAD_ATOL = {torch.float32: 1e-4, torch.float64: 1e-9}
# lse is fp32 for every input dtype, and the kernels compute the scores of 16-bit inputs exactly
# (products exact in fp32, fp32 accumulation), so 16-bit inputs get fp32's lse tolerance.
LSE_ATOL = 1e-4


def _skip_unsupported(device, dtype, d=64):
    if device == "cuda" and dtype == torch.float32:
        pytest.skip("CUDA kernels take float16 / bfloat16")
    if device == "cuda" and d not in (64, 96, 128):
        pytest.skip("CUDA head_dim is 64, 96 or 128")


def _lowp(q, k, v, causal, scale=None):
    """PyTorch computing the same math in the inputs' own dtype: the low-precision baseline."""
    g = q.shape[2] // k.shape[2]
    qf, kf, vf = q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(g, 1), v.transpose(1, 2).repeat_interleave(g, 1)
    out, _ = _attention_bhsd(qf, kf, vf, causal, scale or 1 / math.sqrt(q.shape[-1]))
    return out.transpose(1, 2)


def _inputs(shape, dtype, device, seed=0, grad=True):
    B, Sq, Sk, Hq, Hkv, D = shape
    return (make((B, Sq, Hq, D), dtype, device, seed=seed, requires_grad=grad),
            make((B, Sk, Hkv, D), dtype, device, seed=seed + 1, requires_grad=grad),
            make((B, Sk, Hkv, D), dtype, device, seed=seed + 2, requires_grad=grad))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_flash_attn_forward_backward(device, dtype, causal, shape):
    _skip_unsupported(device, dtype, shape[-1])
    q, k, v = _inputs(shape, dtype, device)
    out, lse = lo.flash_attn(q, k, v, causal=causal, return_lse=True)
    dout = make(out.shape, dtype, device, seed=7)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    out_r, lse_r = lo.flash_attn_reference(qr, kr, vr, causal=causal, return_lse=True)
    grads_r = torch.autograd.grad(out_r, (qr, kr, vr), dout.float())
    qb, kb, vb = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out_b = _lowp(qb, kb, vb, causal)
    grads_b = torch.autograd.grad(out_b, (qb, kb, vb), dout)

    assert out.dtype == dtype and out.is_contiguous() and lse.dtype == torch.float32
    assert lse.shape == (shape[0], shape[3], shape[1])
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert_close(out, out_r, out_b, name="out")
    assert_close(lse, lse_r, atol=LSE_ATOL, rtol=1e-4, name="lse")
    for g, gr, gb, nm in zip(grads, grads_r, grads_b, ("dq", "dk", "dv")):
        assert g.dtype == dtype and not torch.isnan(g).any()
        assert_close(g, gr, gb, name=nm, atol=GRAD_ATOL.get(dtype), rtol=1e-4 if dtype == torch.float32 else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (8, 2), (8, 1)])
def test_matches_sdpa_cpu(dtype, causal, hq, hkv):
    B, S, D = 2, 77, 64
    q, k, v = (make((B, h, S, D), dtype, "cpu", seed=i) for i, h in enumerate((hq, hkv, hkv)))
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    ours = lo.flash_attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal).transpose(1, 2)
    if dtype == torch.float32:
        assert_close(ours, sdpa, name="out vs SDPA")
    else:
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal, enable_gqa=True)
        assert_close(ours, ref, sdpa, name="out vs SDPA (bf16 rule)")


@pytest.mark.parametrize("device", DEVICES)
def test_fully_masked_rows_are_zero_not_nan(device):
    """Rule: a query with no visible key (causal, Sq > Sk: queries i < Sq - Sk) gets out = 0,
    lse = -inf and zero gradients; same in the reference."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = _inputs((1, 9, 4, 2, 1, 64), dtype, device)
    out, lse = lo.flash_attn(q, k, v, causal=True, return_lse=True)
    assert torch.all(out[:, :5] == 0) and torch.all(lse[:, :, :5] == float("-inf"))
    assert torch.isfinite(lse[:, :, 5:]).all() and not torch.isnan(out).any()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert torch.all(dq[:, :5] == 0) and all(torch.isfinite(g).all() for g in (dq, dk, dv))
    out_r, lse_r = lo.flash_attn_reference(q.float(), k.float(), v.float(), causal=True, return_lse=True)
    assert torch.all(out_r[:, :5] == 0) and torch.all(lse_r[:, :, :5] == float("-inf"))
    # Sk == 0: every row is fully masked, causal or not
    q0, k0, v0 = _inputs((2, 3, 0, 2, 2, 64), dtype, device, grad=False)
    for causal in (True, False):
        o, l = lo.flash_attn(q0, k0, v0, causal=causal, return_lse=True)
        assert torch.all(o == 0) and torch.all(l == float("-inf"))


def _same(a, b, name):
    """Bitwise on CPU (rows never mix); on CUDA close (the backward's dQ accumulation order)."""
    if a.is_cuda:
        torch.testing.assert_close(a, b, equal_nan=True, msg=lambda m: f"{name}: {m}")
    else:
        assert torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(), b.nan_to_num()), name


def _sdpa_nan_rows(q, k, v, causal):
    """Rows (B, S, H) where PyTorch's math SDPA (fp64, GQA repeated) outputs NaN."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    g = q.shape[2] // k.shape[2]
    qd, kd, vd = (t.detach().double().transpose(1, 2) for t in (q, k, v))
    with sdpa_kernel(SDPBackend.MATH):
        o = F.scaled_dot_product_attention(qd, kd.repeat_interleave(g, 1), vd.repeat_interleave(g, 1), is_causal=causal)
    return torch.isnan(o.transpose(1, 2)).any(-1).cpu()


def check_nan_propagation(device, dtype):
    """A NaN in q makes its own row's out and lse NaN (before: out 0, lse -inf, as if fully
    masked — PyTorch's CPU flash SDPA does the same, its math SDPA gives NaN); a NaN in k makes
    NaN every row that sees that key; a NaN in v every row that sees it (lse untouched). Rows the
    NaN cannot reach are bit-identical to a clean run. Backward: dq of the NaN row and dk / dv of
    every key it sees are NaN, never finite garbage; other (sequence, kv head) groups untouched.
    Real masking is unchanged: rows with no visible key stay out 0, lse -inf."""
    B, S, Hq, Hkv, D = 2, 150, 4, 2, 64
    for causal in (True, False):
        clean = _inputs((B, S, S, Hq, Hkv, D), dtype, device, seed=3)
        out0, lse0 = lo.flash_attn(*clean, causal=causal, return_lse=True)
        dout = make(out0.shape, dtype, device, seed=8)
        g0 = torch.autograd.grad(out0, clean, dout)
        seen = lambda j: (torch.arange(S) >= j) if causal else torch.ones(S, dtype=torch.bool)  # noqa: E731
        for which, (b, pos, h) in (("q", (1, 70, 3)), ("k", (0, 100, 0)), ("v", (0, 30, 1))):
            q, k, v = (t.detach().clone() for t in clean)
            {"q": q, "k": k, "v": v}[which][b, pos, h, 5] = float("nan")
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            out, lse = lo.flash_attn(q, k, v, causal=causal, return_lse=True)
            rows = torch.zeros(B, S, Hq, dtype=torch.bool)  # (b, i, head) that must be NaN
            if which == "q":
                rows[b, pos, h] = True
            else:
                rows[b, :, h * (Hq // Hkv):(h + 1) * (Hq // Hkv)] = seen(pos)[:, None]
            nan_rows = torch.isnan(out).all(-1).cpu()
            if which in ("q", "k"):
                assert torch.isnan(out).any(-1).cpu().equal(nan_rows), f"{which}: a NaN row must be NaN in every column"
                assert torch.equal(nan_rows, rows), f"NaN in {which} (causal={causal}): wrong rows of out are NaN"
                assert torch.equal(torch.isnan(lse).cpu(), rows.permute(0, 2, 1)), f"NaN in {which}: lse"
                sdpa = _sdpa_nan_rows(q, k, v, causal)
                # math SDPA adds its causal mask, and NaN + -inf is NaN: a NaN key also poisons
                # the rows that cannot see it there; we mask, so exactly the rows that see it
                assert torch.equal(sdpa, rows) if which == "q" else bool(sdpa[rows].all()), "math SDPA disagrees"
                keep = ~rows.to(out.device)
                _same(out[keep], out0[keep], f"{which}: rows the NaN cannot reach")
                _same(lse.permute(0, 2, 1)[keep], lse0.permute(0, 2, 1)[keep], f"{which}: lse of those rows")
            else:  # v[.., 5] is NaN: column 5 of every row that sees it (0 * NaN in P V may reach
                # rows that do not, as in SDPA); the other columns and lse are untouched
                assert torch.isnan(out[..., 5]).cpu()[rows].all(), f"NaN in v (causal={causal}): a row that sees it"
                cols = torch.arange(D, device=out.device) != 5
                _same(out[..., cols], out0[..., cols], "v: the other columns")
                _same(lse, lse0, "v: lse does not depend on v")
            if which != "q":
                continue
            dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
            assert torch.isnan(dq[b, pos, h]).all(), "dq of the NaN row must be NaN"
            hk = h // (Hq // Hkv)
            vis = seen(0).clone() if not causal else (torch.arange(S) <= pos)
            assert torch.isnan(dk[b, vis, hk]).all(-1).all() and torch.isnan(dv[b, vis, hk]).all(-1).all(), \
                "dk / dv of every key the NaN row sees must be NaN"
            other = torch.ones(B, S, Hq, dtype=torch.bool)
            other[b, pos, h] = False
            assert torch.isfinite(dq[other.to(dq.device)]).all(), "dq of the other rows must stay finite"
            _same(dq[0], g0[0][0], "dq of the other sequence")
            _same(dk[0], g0[1][0], "dk of the other sequence")
            _same(dv[0], g0[2][0], "dv of the other sequence")
            _same(dk[b, :, 1 - hk], g0[1][b, :, 1 - hk], "dk of the other kv head")

    # varlen: the same rule per packed row; the sequence without a NaN is untouched
    q, k, v, cu, cuk, mq, mk = _varlen_case([150, 97], [150, 97], Hq, Hkv, D, dtype, device)
    o0, l0 = lo.flash_attn_varlen(q, k, v, cu, cuk, mq, mk, return_lse=True)
    qn = q.detach().clone()
    qn[150 + 40, 2, 7] = float("nan")
    o, l = lo.flash_attn_varlen(qn, k, v, cu, cuk, mq, mk, return_lse=True)
    bad = torch.zeros(o.shape[:2], dtype=torch.bool)
    bad[190, 2] = True
    assert torch.equal(torch.isnan(o).any(-1).cpu(), bad) and torch.isnan(o[190, 2]).all()
    assert torch.equal(torch.isnan(l).cpu(), bad.t()), "varlen lse"
    _same(o[~bad.to(o.device)], o0.detach()[~bad.to(o.device)], "varlen: other rows")

    # KV cache decode: a NaN query (and a NaN appended key) poison only what they reach
    kc, vc = make((2, 300, Hkv, D), dtype, device, seed=1), make((2, 300, Hkv, D), dtype, device, seed=2)
    lens = torch.tensor([120, 257], dtype=torch.int32, device=device)
    qd = make((2, 1, Hq, D), dtype, device, seed=4)
    o0, l0 = lo.flash_attn_with_kvcache(qd, kc.clone(), vc.clone(), lens, return_lse=True)
    qd[1, 0, 3, 0] = float("nan")
    o, l = lo.flash_attn_with_kvcache(qd, kc.clone(), vc.clone(), lens, return_lse=True)
    bad = torch.zeros(2, 1, Hq, dtype=torch.bool)
    bad[1, 0, 3] = True
    assert torch.equal(torch.isnan(o).any(-1).cpu(), bad) and torch.isnan(o[1, 0, 3]).all()
    assert torch.equal(torch.isnan(l).cpu(), bad.permute(0, 2, 1)), "kvcache lse"
    _same(o[~bad.to(o.device)], o0[~bad.to(o.device)], "kvcache: other rows")
    kn, vn = make((2, 1, Hkv, D), dtype, device, seed=5), make((2, 1, Hkv, D), dtype, device, seed=6)
    kn[0, 0, 1, 3] = float("nan")
    o, l = lo.flash_attn_with_kvcache(qd.nan_to_num(), kc.clone(), vc.clone(), lens, k_new=kn, v_new=vn,
                                      return_lse=True)
    bad = torch.zeros(2, 1, Hq, dtype=torch.bool)
    bad[0, 0, 2:] = True  # q heads 2, 3 read kv head 1, which now holds the NaN key
    assert torch.equal(torch.isnan(o).any(-1).cpu(), bad) and torch.equal(torch.isnan(l).cpu(), bad.permute(0, 2, 1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_propagates(device, dtype):
    _skip_unsupported(device, dtype)
    check_nan_propagation(device, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_scale_and_lse(device, dtype):
    _skip_unsupported(device, dtype)
    q, k, v = _inputs((2, 33, 50, 4, 2, 64), dtype, device, grad=False)
    out, lse = lo.flash_attn(q, k, v, causal=True, softmax_scale=0.3, return_lse=True)
    out_r, lse_r = lo.flash_attn_reference(q.float(), k.float(), v.float(), causal=True, softmax_scale=0.3,
                                           return_lse=True)
    assert_close(out, out_r, _lowp(q, k, v, True, 0.3), name="out")
    assert_close(lse, lse_r, atol=LSE_ATOL, rtol=1e-4, name="lse")


def _varlen_case(lens_q, lens_k, hq, hkv, d, dtype, device, seed=0):
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0).tolist()), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0).tolist()), dtype=torch.int32, device=device)
    q = make((sum(lens_q), hq, d), dtype, device, seed=seed, requires_grad=True)
    k = make((sum(lens_k), hkv, d), dtype, device, seed=seed + 1, requires_grad=True)
    v = make((sum(lens_k), hkv, d), dtype, device, seed=seed + 2, requires_grad=True)
    return q, k, v, cu_q, cu_k, max(lens_q), max(lens_k)


VARLEN = [
    ([1, 2, 3, 4, 5, 6, 7, 8], None),          # documents of lengths 1..N
    ([1, 127, 128, 129, 17], None),
    ([200, 1, 64, 65], None),
    ([5, 0, 9], None),                          # an empty document
    ([3, 17, 40], [10, 17, 100]),               # Sq <= Sk per sequence (bottom-right causal)
    ([9, 4], [4, 9]),                           # Sq > Sk: fully masked causal rows
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lens", VARLEN, ids=lambda x: str(x))
def test_varlen_forward_backward(device, dtype, causal, lens):
    _skip_unsupported(device, dtype)
    lens_q, lens_k = lens[0], lens[1] or lens[0]
    q, k, v, cu_q, cu_k, mq, mk = _varlen_case(lens_q, lens_k, 4, 2, 64, dtype, device)
    out, lse = lo.flash_attn_varlen(q, k, v, cu_q, cu_k, mq, mk, causal=causal, return_lse=True)
    dout = make(out.shape, dtype, device, seed=9)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    out_r, lse_r = lo.flash_attn_varlen_reference(qr, kr, vr, cu_q, cu_k, mq, mk, causal=causal, return_lse=True)
    grads_r = torch.autograd.grad(out_r, (qr, kr, vr), dout.float())
    assert lse.shape == (4, q.shape[0]) and not torch.isnan(out).any()
    # the low-precision baseline: per-document PyTorch math in the input dtype
    cq, ck = cu_q.tolist(), cu_k.tolist()
    qb, kb, vb = (t.detach().clone().requires_grad_() for t in (q, k, v))
    outs = [_lowp(qb[None, cq[i]:cq[i + 1]], kb[None, ck[i]:ck[i + 1]], vb[None, ck[i]:ck[i + 1]], causal)[0]
            for i in range(len(cq) - 1)]
    out_b = torch.cat(outs)
    grads_b = torch.autograd.grad(out_b, (qb, kb, vb), dout)
    assert_close(out, out_r, out_b, name="out")
    assert_close(lse, lse_r, atol=LSE_ATOL, rtol=1e-4, name="lse")
    for g, gr, gb, nm in zip(grads, grads_r, grads_b, ("dq", "dk", "dv")):
        assert_close(g, gr, gb, name=nm, atol=GRAD_ATOL.get(dtype), rtol=1e-4 if dtype == torch.float32 else None)


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_never_crosses_documents(device):
    """Packing documents == running each on its own (bitwise on CPU: same tiles, same order)."""
    dtype = torch.bfloat16
    q, k, v, cu, _, m, _ = _varlen_case([7, 130, 1, 64], [7, 130, 1, 64], 4, 1, 64, dtype, device)
    out = lo.flash_attn_varlen(q, k, v, cu, cu, m, m, causal=True)
    c = cu.tolist()
    for i in range(len(c) - 1):
        sl = slice(c[i], c[i + 1])
        alone = lo.flash_attn(q[None, sl], k[None, sl], v[None, sl], causal=True)[0]
        if device == "cpu":
            assert torch.equal(out[sl], alone)
        else:
            assert_close(out[sl], alone.float(), atol=1e-2, name=f"doc {i}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cache_len", [0, 1, 17, 128, 1000, 4095])
@pytest.mark.parametrize("s_new", [1, 3])
def test_kvcache_decode(device, dtype, cache_len, s_new):
    _skip_unsupported(device, dtype)
    B, Smax, Hq, Hkv, D = 2, 4096 + 8, 8, 2, 64
    k_cache = make((B, Smax, Hkv, D), dtype, device, seed=1)
    v_cache = make((B, Smax, Hkv, D), dtype, device, seed=2)
    lens = torch.tensor([cache_len, max(0, cache_len // 2 - 1)], dtype=torch.int32, device=device)
    q = make((B, s_new, Hq, D), dtype, device, seed=3)
    k_new, v_new = make((B, s_new, Hkv, D), dtype, device, seed=4), make((B, s_new, Hkv, D), dtype, device, seed=5)
    kc_r, vc_r = k_cache.clone(), v_cache.clone()
    out, lse = lo.flash_attn_with_kvcache(q, k_cache, v_cache, lens, k_new=k_new, v_new=v_new, causal=True,
                                          return_lse=True)
    out_r, lse_r = lo.flash_attn_with_kvcache_reference(q.float(), kc_r.float(), vc_r.float(), lens, k_new.float(),
                                                        v_new.float(), causal=True, return_lse=True)
    for b, n in enumerate(lens.tolist()):  # appended in place, nothing else touched
        assert torch.equal(k_cache[b, n:n + s_new], k_new[b]) and torch.equal(v_cache[b, n:n + s_new], v_new[b])
        assert torch.equal(k_cache[b, :n], kc_r[b, :n]) and torch.equal(k_cache[b, n + s_new:], kc_r[b, n + s_new:])
    base = torch.cat([_lowp(q[b:b + 1], k_cache[b:b + 1, :n + s_new], v_cache[b:b + 1, :n + s_new], True)
                      for b, n in enumerate(lens.tolist())])
    assert_close(out, out_r, base, name="out")
    assert_close(lse, lse_r, atol=LSE_ATOL, rtol=1e-4, name="lse")


@pytest.mark.parametrize("device", DEVICES)
def test_kvcache_without_append_and_empty_cache(device):
    dtype = torch.bfloat16
    B, Smax, H, D = 3, 300, 4, 128
    kc, vc = make((B, Smax, H, D), dtype, device, seed=1), make((B, Smax, H, D), dtype, device, seed=2)
    lens = torch.tensor([0, 1, 257], dtype=torch.int32, device=device)
    q = make((B, 1, H, D), dtype, device, seed=3)
    before = kc.clone()
    out, lse = lo.flash_attn_with_kvcache(q, kc, vc, lens, return_lse=True)
    assert torch.equal(kc, before)
    assert torch.all(out[0] == 0) and torch.all(lse[0] == float("-inf")), "empty cache: out 0, lse -inf"
    out_r, lse_r = lo.flash_attn_with_kvcache_reference(q.float(), kc.float(), vc.float(), lens, return_lse=True)
    base = torch.cat([_lowp(q[b:b + 1], kc[b:b + 1, :n], vc[b:b + 1, :n], True) if n else out[:1] * 0
                      for b, n in enumerate(lens.tolist())])  # each sequence's own bf16 baseline
    assert_close(out, out_r, base, name="out")
    assert_close(lse, lse_r, atol=LSE_ATOL, rtol=1e-4, name="lse")


def test_kvcache_errors():
    kc, vc = torch.zeros(2, 8, 2, 64), torch.zeros(2, 8, 2, 64)
    q, kn = torch.randn(2, 2, 4, 64), torch.randn(2, 2, 2, 64)
    with pytest.raises(RuntimeError, match="does not fit in the cache"):
        lo.flash_attn_with_kvcache(q, kc, vc, torch.tensor([7, 0], dtype=torch.int32), k_new=kn, v_new=kn)
    with pytest.raises(RuntimeError, match="'cache_seqlens' must be int32"):
        lo.flash_attn_with_kvcache(q, kc, vc, torch.tensor([1, 0]), k_new=kn, v_new=kn)
    with pytest.raises(RuntimeError, match="'k_new' and 'v_new' must be given together"):
        lo.flash_attn_with_kvcache(q, kc, vc, torch.tensor([1, 0], dtype=torch.int32), k_new=kn)
    with pytest.raises(RuntimeError, match="'k_new' must have shape"):
        lo.flash_attn_with_kvcache(q, kc, vc, torch.tensor([1, 0], dtype=torch.int32), k_new=kn[:, :, :1],
                                   v_new=kn[:, :, :1])


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs(device):
    """q/k/v as head slices of a fused qkv projection (B, S, (Hq + 2 Hkv) * D): read in place;
    a non-unit stride in D is copied."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    B, S, Hq, Hkv, D = 2, 37, 4, 2, 64
    qkv = make((B, S, (Hq + 2 * Hkv) * D), dtype, device).view(B, S, Hq + 2 * Hkv, D)
    q, k, v = qkv[:, :, :Hq], qkv[:, :, Hq:Hq + Hkv], qkv[:, :, Hq + Hkv:]
    ref = lo.flash_attn_reference(q.float(), k.float(), v.float())
    out = lo.flash_attn(q, k, v)
    assert_close(out, ref, _lowp(q, k, v, True), name="fused-qkv view")
    qt = make((B, Hq, D, S), dtype, device).permute(0, 3, 1, 2)  # D stride != 1
    assert_close(lo.flash_attn(qt, k, v), lo.flash_attn_reference(qt.float(), k.float(), v.float()),
                 _lowp(qt, k, v, True), name="non-unit D stride")
    # varlen on strided packed views
    flat = qkv.reshape(B * S, Hq + 2 * Hkv, D)
    cu = torch.tensor([0, 30, B * S], dtype=torch.int32, device=device)
    o = lo.flash_attn_varlen(flat[:, :Hq], flat[:, Hq:Hq + Hkv], flat[:, Hq + Hkv:], cu, cu, B * S - 30, B * S - 30)
    o_r = lo.flash_attn_varlen_reference(flat[:, :Hq].float(), flat[:, Hq:Hq + Hkv].float(), flat[:, Hq + Hkv:].float(),
                                         cu, cu, B * S - 30, B * S - 30)
    o_b = torch.cat([_lowp(flat[None, sl, :Hq], flat[None, sl, Hq:Hq + Hkv], flat[None, sl, Hq + Hkv:], True)[0]
                     for sl in (slice(0, 30), slice(30, B * S))])  # per sequence, in the inputs' dtype
    assert_close(o, o_r, o_b if dtype != torch.float32 else None, name="varlen strided")


@pytest.mark.parametrize("device", DEVICES)
def test_empty(device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = _inputs((0, 5, 5, 2, 1, 64), dtype, device)
    out = lo.flash_attn(q, k, v)
    assert out.shape == q.shape
    q, k, v = _inputs((2, 0, 5, 2, 1, 64), dtype, device)
    out, lse = lo.flash_attn(q, k, v, return_lse=True)
    assert out.shape == q.shape and lse.shape == (2, 2, 0)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert dq.shape == q.shape and torch.all(dk == 0) and torch.all(dv == 0)
    q, k, v, cu, _, _, _ = _varlen_case([1], [1], 2, 1, 64, dtype, device)
    o = lo.flash_attn_varlen(q[:0], k[:0], v[:0], cu[:1] * 0, cu[:1] * 0, 0, 0)
    assert o.shape == (0, 2, 64)


def test_bad_input_errors():
    q, k = torch.randn(1, 4, 4, 64), torch.randn(1, 4, 2, 64)
    with pytest.raises(RuntimeError, match="'q' and 'k' must have the same dtype"):
        lo.flash_attn(q, k.double(), k.double())
    with pytest.raises(RuntimeError, match="divisible by k's number of heads"):
        lo.flash_attn(q, torch.randn(1, 4, 3, 64), torch.randn(1, 4, 3, 64))
    with pytest.raises(RuntimeError, match="'k' must have head_dim 64"):
        lo.flash_attn(q, torch.randn(1, 4, 2, 32), torch.randn(1, 4, 2, 32))
    with pytest.raises(RuntimeError, match="'k' and 'v' must have the same shape"):
        lo.flash_attn(q, k, torch.randn(1, 5, 2, 64))
    with pytest.raises(RuntimeError, match="'q' must be 4-D"):
        lo.flash_attn(q[0], k, k)
    with pytest.raises(RuntimeError, match="'q' must be float32"):
        lo.flash_attn(q.int(), k.int(), k.int())
    with pytest.raises(RuntimeError, match="head_dim must be <= 256"):
        lo.flash_attn(torch.randn(1, 2, 1, 300), torch.randn(1, 2, 1, 300), torch.randn(1, 2, 1, 300))
    with pytest.raises(RuntimeError, match="'k' must have batch size 1"):
        lo.flash_attn(q, torch.randn(2, 4, 2, 64), torch.randn(2, 4, 2, 64))
    qv, kv = torch.randn(10, 4, 64), torch.randn(10, 2, 64)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="'cu_seqlens_q' must be int32"):
        lo.flash_attn_varlen(qv, kv, kv, cu.long(), cu, 6, 6)
    with pytest.raises(RuntimeError, match="lengths <= max_seqlen_q"):
        lo.flash_attn_varlen(qv, kv, kv, cu, cu, 5, 6)
    with pytest.raises(RuntimeError, match="ends at 11"):
        lo.flash_attn_varlen(qv, kv, kv, torch.tensor([0, 4, 11], dtype=torch.int32), cu, 7, 6)


def test_head_dim_zero_is_a_clear_error():
    """head_dim 0 raised ZeroDivisionError from the default softmax_scale 1/sqrt(D)."""
    q = torch.randn(1, 4, 2, 0)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    calls = [lambda: lo.flash_attn(q, q, q), lambda: lo.flash_attn_reference(q, q, q),
             lambda: lo.flash_attn(q, q, q, softmax_scale=1.0),
             lambda: lo.flash_attn_varlen(q[0], q[0], q[0], cu, cu, 4, 4),
             lambda: lo.flash_attn_with_kvcache(q, q.clone(), q.clone(), torch.tensor([2], dtype=torch.int32))]
    for call in calls:
        with pytest.raises((ValueError, RuntimeError), match=r"argument 'q' must have head_dim > 0, got shape \[1, 4, 2, 0\]|"
                                                              r"argument 'q' must have head_dim > 0, got shape \[4, 2, 0\]"):
            call()


def test_kvcache_refuses_inputs_that_require_grad():
    """flash_attn_with_kvcache is inference-only: an input that requires grad (under grad mode) is
    refused before anything runs or is written, naming the argument — before, the output carried
    a grad_fn whose backward warned and silently gave q no gradient. Under no_grad it just runs."""
    kc, vc = make((1, 8, 2, 64), torch.float32, "cpu", seed=1), make((1, 8, 2, 64), torch.float32, "cpu", seed=2)
    lens = torch.tensor([3], dtype=torch.int32)
    q, kn = make((1, 1, 4, 64), torch.float32, "cpu"), make((1, 1, 2, 64), torch.float32, "cpu", seed=3)
    for name, args in (("q", (q.clone().requires_grad_(), kc, vc, lens, kn, kn)),
                       ("k_new", (q, kc, vc, lens, kn.clone().requires_grad_(), kn)),
                       ("k_cache", (q, kc.clone().requires_grad_(), vc, lens, kn, kn))):
        before = (args[1].detach().clone(), args[2].detach().clone())
        for call in (lambda: lo.flash_attn_with_kvcache(*args),
                     lambda: torch.ops.llmcore.flash_attn_with_kvcache(*args, 0.125, True)):
            with pytest.raises(RuntimeError, match=f"flash_attn_with_kvcache is inference-only.*argument '{name}' "
                                                   "requires grad"):
                call()
            assert torch.equal(args[1].detach(), before[0]) and torch.equal(args[2].detach(), before[1]), \
                "nothing may be appended to the cache before the error"
    qg = q.clone().requires_grad_()
    with torch.no_grad():
        out = lo.flash_attn_with_kvcache(qg, kc.clone(), vc.clone(), lens)
    assert not out.requires_grad
    assert_close(out, lo.flash_attn_with_kvcache_reference(q, kc.clone(), vc.clone(), lens), name="no_grad")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_errors():
    q = torch.randn(1, 4, 2, 64, device="cuda")
    with pytest.raises(RuntimeError, match="float16 or bfloat16 on CUDA"):
        lo.flash_attn(q, q, q)
    q = torch.randn(1, 4, 2, 80, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="64, 96 or 128 on CUDA"):
        lo.flash_attn(q, q, q)
    with pytest.raises(RuntimeError, match="same device"):
        lo.flash_attn(q, q.cpu(), q.cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, dtype):
    _skip_unsupported(device, dtype)
    ops = torch.ops.llmcore
    q, k, v = _inputs((2, 9, 13, 4, 2, 64), dtype, device)
    out, lse = ops.flash_attn_fwd(q, k, v, 0.125, True)
    torch.library.opcheck(ops.flash_attn_fwd.default, (q, k, v, 0.125, True))
    dout = make(out.shape, dtype, device, seed=5)
    torch.library.opcheck(ops.flash_attn_bwd.default, (dout, q.detach(), k.detach(), v.detach(), out.detach(),
                                                       lse, 0.125, True))
    qv, kv, vv, cu_q, cu_k, mq, mk = _varlen_case([3, 9, 1], [5, 9, 2], 4, 2, 64, dtype, device)
    torch.library.opcheck(ops.flash_attn_varlen_fwd.default, (qv, kv, vv, cu_q, cu_k, mq, mk, 0.125, False))
    o, l = ops.flash_attn_varlen_fwd(qv, kv, vv, cu_q, cu_k, mq, mk, 0.125, False)
    torch.library.opcheck(ops.flash_attn_varlen_bwd.default,
                          (make(o.shape, dtype, device), qv.detach(), kv.detach(), vv.detach(), o.detach(), l, cu_q,
                           cu_k, mq, mk, 0.125, False))
    kc, vc = make((2, 32, 2, 64), dtype, device, seed=1), make((2, 32, 2, 64), dtype, device, seed=2)
    lens = torch.tensor([3, 20], dtype=torch.int32, device=device)
    qd, kn, vn = make((2, 2, 4, 64), dtype, device), make((2, 2, 2, 64), dtype, device), make((2, 2, 2, 64), dtype, device)
    torch.library.opcheck(ops.flash_attn_with_kvcache.default, (qd, kc, vc, lens, kn, vn, 0.125, True),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck_float64(causal):
    q, k, v = _inputs((1, 5, 7, 4, 2, 16), torch.float64, "cpu")
    assert torch.autograd.gradcheck(lambda a, b, c: lo.flash_attn(a, b, c, causal=causal), (q, k, v))
    q, k, v = _inputs((1, 7, 5, 2, 1, 8), torch.float64, "cpu")  # Sq > Sk: fully masked rows
    assert torch.autograd.gradcheck(lambda a, b, c: lo.flash_attn(a, b, c, causal=causal), (q, k, v))
    qv, kv, vv, cu_q, cu_k, mq, mk = _varlen_case([2, 5, 1], [3, 5, 4], 2, 1, 8, torch.float64, "cpu")
    assert torch.autograd.gradcheck(lambda a, b, c: lo.flash_attn_varlen(a, b, c, cu_q, cu_k, mq, mk, causal=causal),
                                    (qv, kv, vv))


@pytest.mark.parametrize("device", DEVICES)
def test_backward_deterministic(device):
    dtype = torch.bfloat16
    q, k, v = _inputs((1, 300, 300, 4, 1, 64), dtype, device)
    out = lo.flash_attn(q, k, v)
    dout = make(out.shape, dtype, device, seed=3)
    g1 = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    g2 = torch.autograd.grad(out, (q, k, v), dout)
    names = ("dq", "dk", "dv") if device == "cpu" else ("dk", "dv")  # CUDA dq: fp32 atomics
    for a, b, nm in zip(g1 if device == "cpu" else g1[1:], g2 if device == "cpu" else g2[1:], names):
        assert torch.equal(a, b), f"{nm} differs between two identical backward passes"


# ---- CPU bf16 inputs on AVX512-BF16 CPUs: vdpbf16ps tile GEMMs (flash_attn_bf16_cpu.cpp) ----
def _skip_without_bf16_dot():
    import llmcore
    if not llmcore.build_info()["cpu_avx512bf16_path"]:
        pytest.skip("CPU bf16 flash attention runs the fp32 tile path here: no avx512_bf16 on this CPU, "
                    "or LLMCORE_CPU_BF16_PATH=0")


# several 64-key tiles, tails, GQA 1/2/4/8, D 64/128/80 (Dp % 32 == 16)/63 (odd: a half pair),
# Sq < Sk and Sq > Sk (fully masked causal rows), and B * Hkv >= 8 with 10 key blocks so the
# backward's single split runs more than one 8-block chunk.
BF16DOT_SHAPES = [
    (1, 300, 300, 4, 1, 64),
    (2, 200, 260, 4, 2, 128),
    (1, 300, 200, 4, 2, 64),
    (1, 257, 257, 2, 2, 80),
    (1, 130, 150, 8, 1, 63),
    (1, 600, 600, 8, 8, 64),
    (1, 150, 150, 2, 1, 256),
    (1, 150, 150, 2, 2, 8),
]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", BF16DOT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpu_bf16_dot_forward_backward(causal, shape):
    _skip_without_bf16_dot()
    test_flash_attn_forward_backward("cpu", torch.bfloat16, causal, shape)


def test_cpu_bf16_dot_strided():
    """Multi-tile bf16 on the AVX512-BF16 path with q/k/v as head slices of a fused qkv tensor
    (row stride (Hq + 2 Hkv) * D) and as (B, H, S, D) tensors transposed to (B, S, H, D)."""
    _skip_without_bf16_dot()
    B, S, Hq, Hkv, D = 2, 200, 4, 2, 64
    qkv = make((B, S, (Hq + 2 * Hkv) * D), torch.bfloat16, "cpu", requires_grad=True)
    views = [lambda: tuple(t for t in (qkv.view(B, S, -1, D)[:, :, :Hq], qkv.view(B, S, -1, D)[:, :, Hq:Hq + Hkv],
                                       qkv.view(B, S, -1, D)[:, :, Hq + Hkv:]))]
    bhsd = [make((B, h, S, D), torch.bfloat16, "cpu", seed=i, requires_grad=True) for i, h in enumerate((Hq, Hkv, Hkv))]
    views.append(lambda: tuple(t.transpose(1, 2) for t in bhsd))
    dout = make((B, S, Hq, D), torch.bfloat16, "cpu", seed=9)
    for causal in (True, False):
        for view in views:
            q, k, v = view()
            assert q.stride(1) != Hq * D or q.stride(2) != D
            out = lo.flash_attn(q, k, v, causal=causal)
            leaves = (qkv,) if view is views[0] else tuple(bhsd)
            grads = torch.autograd.grad(out, leaves, dout)
            qc, kc, vc = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
            out_c = lo.flash_attn(qc, kc, vc, causal=causal)
            assert torch.equal(out, out_c), "strided and contiguous inputs give different bits"
            gc = torch.autograd.grad(out_c, (qc, kc, vc), dout)
            if view is views[0]:
                assert torch.equal(grads[0].view(B, S, -1, D), torch.cat(gc, dim=2))
            else:
                for g, c in zip(grads, gc):
                    assert torch.equal(g, c.transpose(1, 2))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lens", [([300, 1, 130, 0, 77], None), ([100, 3, 64], [600, 40, 64]), ([250, 9], [120, 4])],
                         ids=lambda x: str(x))
def test_cpu_bf16_dot_varlen(causal, lens):
    _skip_without_bf16_dot()
    test_varlen_forward_backward("cpu", torch.bfloat16, causal, lens)


@pytest.mark.parametrize("cache_len", [200, 1000])
def test_cpu_bf16_dot_kvcache_decode(cache_len):
    _skip_without_bf16_dot()
    test_kvcache_decode("cpu", torch.bfloat16, cache_len, 3)


def test_cpu_bf16_dot_fully_masked_rows():
    """Causal, Sq = 300 > Sk = 200: queries 0..99 see no key -> out 0, lse -inf, dq 0, all finite."""
    _skip_without_bf16_dot()
    q, k, v = _inputs((1, 300, 200, 4, 2, 64), torch.bfloat16, "cpu")
    out, lse = lo.flash_attn(q, k, v, causal=True, return_lse=True)
    assert torch.all(out[:, :100] == 0) and torch.all(lse[:, :, :100] == float("-inf"))
    assert torch.isfinite(lse[:, :, 100:]).all() and torch.isfinite(out).all()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), make(out.shape, torch.bfloat16, "cpu", seed=5))
    assert torch.all(dq[:, :100] == 0) and all(torch.isfinite(g).all() for g in (dq, dk, dv))


def test_cpu_bf16_fp32_tile_fallback():
    """bf16 on CPUs without AVX512-BF16 runs the fp32 tile path; LLMCORE_CPU_BF16_PATH=0 forces
    it (read once per process, hence the subprocess), so that path stays tested on any machine."""
    import os
    import subprocess
    import sys
    code = (
        "import torch, llmcore, tests.ops.test_flash_attn as t\n"
        "assert llmcore.build_info()['cpu_avx512bf16_path'] is False, llmcore.build_info()\n"
        "for causal in (True, False):\n"
        "    t.test_flash_attn_forward_backward('cpu', torch.bfloat16, causal, (1, 300, 200, 4, 2, 64))\n"
        "    t.test_varlen_forward_backward('cpu', torch.bfloat16, causal, ([130, 1, 70], None))\n"
        "t.test_kvcache_decode('cpu', torch.bfloat16, 1000, 3)\n"
        "t.check_nan_propagation('cpu', torch.bfloat16)\n")
    env = dict(os.environ, LLMCORE_CPU_BF16_PATH="0")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(x for x in (root, env.get("PYTHONPATH")) if x)
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("causal", [True, False])
def test_cpu_bitwise_independent_of_thread_count(dtype, causal):
    """Forward and backward on CPU give the same bits with 1 and 2 threads (the work items and
    the backward's key splits depend on the shapes only). bf16 takes the AVX512-BF16 path where
    the CPU has it, the fp32 tile path otherwise; both must hold."""
    q, k, v = _inputs((2, 333, 333, 8, 2, 64), dtype, "cpu")
    dout = make((2, 333, 8, 64), dtype, "cpu", seed=4)

    def run():
        out, lse = lo.flash_attn(q, k, v, causal=causal, return_lse=True)
        return (out, lse, *torch.autograd.grad(out, (q, k, v), dout))

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(threads)
    for a, b, nm in zip(one, two, ("out", "lse", "dq", "dk", "dv")):
        assert torch.equal(a, b), f"{nm} differs between 1 and 2 threads"


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 2), sq=st.integers(1, 140), sk=st.integers(1, 140), g=st.sampled_from([1, 2, 4]),
       hkv=st.integers(1, 2), d=st.sampled_from([8, 40, 64, 96, 128]), causal=st.booleans(),
       dt=st.sampled_from(DTYPES))
def test_hypothesis_shapes(b, sq, sk, g, hkv, d, causal, dt):
    q, k, v = _inputs((b, sq, sk, hkv * g, hkv, d), dt, "cpu", grad=False)
    assert_close(lo.flash_attn(q, k, v, causal=causal), lo.flash_attn_reference(q.float(), k.float(), v.float(), causal),
                 _lowp(q, k, v, causal))


def test_torch_compile_fullgraph():
    def f(q, k, v, cu):
        a = lo.flash_attn(q, k, v, causal=True)
        b = lo.flash_attn_varlen(q[0], k[0], v[0], cu, cu, 8, 8, causal=True)
        return a[0] * 2 + b

    q, k, v = _inputs((1, 12, 12, 4, 2, 32), torch.float32, "cpu")
    cu = torch.tensor([0, 4, 12], dtype=torch.int32)
    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    out, ref = compiled(q, k, v, cu), f(q, k, v, cu)
    assert_close(out, ref.detach())
    for a, b in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v))):
        assert_close(a, b)


def test_reference_backend_switch():
    q, k, v = _inputs((1, 6, 6, 2, 1, 32), torch.float32, "cpu", grad=False)
    lo.set_backend("reference")
    try:
        assert torch.equal(lo.flash_attn(q, k, v), lo.flash_attn_reference(q, k, v))
    finally:
        lo.set_backend("llmcore")


# ---------------------------------------------------------------- the oracle itself
def _bottom_right_mask(sq, sk, causal):
    """(Sq, Sk) bool, True = visible: query i sees key j <= i + Sk - Sq (FlashAttention's causal)."""
    if not causal:
        return torch.ones(sq, sk, dtype=torch.bool)
    return torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + (sk - sq)


def _sdpa_fp64(q, k, v, mask, scale):
    """PyTorch's math SDPA in float64 with an explicit boolean mask; (B, S, H, D) in and out.
    Also the lse of the masked scaled scores, (B, H, Sq)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=True)
    g = q.shape[2] // k.shape[2]
    s = (qt @ kt.repeat_interleave(g, 1).transpose(-1, -2)) * scale
    return out.transpose(1, 2), torch.logsumexp(s.masked_fill(~mask, float("-inf")), -1)


@pytest.mark.parametrize("shape", [(2, 17, 40, 4, 2, 16), (1, 33, 33, 2, 1, 8), (1, 40, 17, 4, 4, 16),
                                   (2, 1, 50, 8, 2, 16)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_reference_matches_independent_fp64(shape, causal, scale):
    """flash_attn_reference (the kernels' oracle) against math SDPA in float64 with an explicit
    bottom-right mask (SDPA's is_causal is top-left, so Sq != Sk needs the mask), GQA by SDPA's
    own enable_gqa; lse against logsumexp of the masked scores; gradients where SDPA is defined.
    Rows with no visible key (causal, Sq > Sk) are the documented exception: SDPA gives NaN there,
    the reference out 0 and lse -inf."""
    B, Sq, Sk, Hq, Hkv, D = shape
    q, k, v = _inputs(shape, torch.float64, "cpu", seed=11)
    sc = scale if scale is not None else 1 / math.sqrt(D)
    mask = _bottom_right_mask(Sq, Sk, causal)
    out, lse = lo.flash_attn_reference(q, k, v, causal=causal, softmax_scale=scale, return_lse=True)
    out_i, lse_i = _sdpa_fp64(q, k, v, mask, sc)
    seen = mask.any(-1)  # (Sq,) rows with a visible key
    assert_close(out[:, seen], out_i[:, seen], name="out vs SDPA")
    assert_close(lse[:, :, seen], lse_i[:, :, seen], name="lse vs logsumexp")
    assert torch.all(out[:, ~seen] == 0) and torch.all(lse[:, :, ~seen] == float("-inf"))
    if bool(seen.all()):
        dout = make(out.shape, torch.float64, "cpu", seed=12)
        for a, b, nm in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(out_i, (q, k, v), dout),
                            ("dq", "dk", "dv")):
            assert_close(a, b, name=f"{nm} vs SDPA")


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_and_kvcache_references_match_independent_fp64(causal):
    """flash_attn_varlen_reference against ONE math SDPA call over the packed rows with a
    block-diagonal, per-document bottom-right mask (no per-document loop, unlike the reference);
    flash_attn_with_kvcache_reference against SDPA over cache[:len] + the appended rows."""
    lens_q, lens_k = [5, 1, 17, 0, 9], [5, 12, 17, 3, 4]
    q, k, v, cu_q, cu_k, mq, mk = _varlen_case(lens_q, lens_k, 4, 2, 16, torch.float64, "cpu", seed=21)
    tq, tk = sum(lens_q), sum(lens_k)
    q_pad = torch.cat([q, make((3, 4, 16), torch.float64, "cpu", seed=22)])  # 3 rows past the last sequence
    out, lse = lo.flash_attn_varlen_reference(q_pad, k, v, cu_q, cu_k, mq, mk, causal=causal, return_lse=True)
    doc_q = torch.repeat_interleave(torch.arange(len(lens_q)), torch.tensor(lens_q))
    doc_k = torch.repeat_interleave(torch.arange(len(lens_k)), torch.tensor(lens_k))
    iq = torch.arange(tq) - cu_q[doc_q].long()  # position inside its document
    jk = torch.arange(tk) - cu_k[doc_k].long()
    off = (torch.tensor(lens_k) - torch.tensor(lens_q))[doc_q]
    mask = doc_q[:, None] == doc_k[None, :]
    if causal:
        mask &= jk[None, :] <= iq[:, None] + off[:, None]
    out_i, lse_i = _sdpa_fp64(q[None], k[None], v[None], mask, 1 / math.sqrt(16))
    seen = mask.any(-1)
    assert_close(out[:tq][seen], out_i[0][seen], name="varlen out vs SDPA")
    assert_close(lse[:, :tq][:, seen], lse_i[0][:, seen], name="varlen lse")
    assert torch.all(out[:tq][~seen] == 0) and torch.all(lse[:, :tq][:, ~seen] == float("-inf"))
    assert torch.all(out[tq:] == 0) and torch.all(lse[:, tq:] == float("-inf")), "rows past the last sequence"

    B, Smax, Hq, Hkv, D, s_new = 3, 40, 4, 2, 16, 3
    kc, vc = make((B, Smax, Hkv, D), torch.float64, "cpu", seed=23), make((B, Smax, Hkv, D), torch.float64, "cpu", seed=24)
    kn, vn = make((B, s_new, Hkv, D), torch.float64, "cpu", seed=25), make((B, s_new, Hkv, D), torch.float64, "cpu", seed=26)
    qd = make((B, s_new, Hq, D), torch.float64, "cpu", seed=27)
    lens = torch.tensor([0, 7, 30], dtype=torch.int32)
    kc0, vc0 = kc.clone(), vc.clone()
    out, lse = lo.flash_attn_with_kvcache_reference(qd, kc, vc, lens, kn, vn, causal=causal, return_lse=True)
    for b, n in enumerate(lens.tolist()):
        kb, vb = torch.cat([kc0[b, :n], kn[b]])[None], torch.cat([vc0[b, :n], vn[b]])[None]
        assert torch.equal(kc[b, :n + s_new], kb[0]) and torch.equal(kc[b, n + s_new:], kc0[b, n + s_new:])
        o_i, l_i = _sdpa_fp64(qd[b:b + 1], kb, vb, _bottom_right_mask(s_new, n + s_new, causal), 1 / math.sqrt(D))
        assert_close(out[b:b + 1], o_i, name=f"kvcache out, sequence {b}")
        assert_close(lse[b:b + 1], l_i, name=f"kvcache lse, sequence {b}")


# ---- every CPU GEMM engine (common/cpu_gemm.h), forced by LLMCORE_CPU_GEMM (read once: subprocess) ----
_ENGINE_CODE = (
    "import torch, llmcore, tests.ops.test_flash_attn as t\n"
    "got = llmcore.build_info()['cpu_gemm_bf16']\n"
    "if got != '{want}':\n"
    "    print('ENGINE', got); raise SystemExit(3)\n"
    "for causal in (True, False):\n"
    "    for shape in [(1, 300, 200, 4, 2, 64), (2, 130, 150, 4, 2, 128), (1, 257, 257, 2, 2, 80), (1, 70, 90, 2, 1, 63)]:\n"
    "        t.test_flash_attn_forward_backward('cpu', torch.bfloat16, causal, shape)\n"
    "    t.test_varlen_forward_backward('cpu', torch.bfloat16, causal, ([130, 1, 70, 0], None))\n"
    "t.test_kvcache_decode('cpu', torch.bfloat16, 1000, 3)\n"
    "t.check_nan_propagation('cpu', torch.bfloat16)\n"
    "t.test_cpu_bf16_dot_fully_masked_rows()\n")


@pytest.mark.parametrize("engine,want", [("amx", "amx"), ("avx512bf16", "avx512bf16"), ("avx512", "fma"),
                                         ("avx2", "fma")])
def test_cpu_gemm_engine_matches_reference(engine, want):
    """bf16 flash attention (fwd, bwd, varlen, KV-cache decode, NaN, fully masked rows) against the
    fp32 reference on each tile-GEMM engine LLMCORE_CPU_GEMM can force; an engine this CPU lacks
    is skipped with the engine it has."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, LLMCORE_CPU_GEMM=engine)
    env.pop("LLMCORE_CPU_BF16_PATH", None)
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(x for x in (root, env.get("PYTHONPATH")) if x)
    r = subprocess.run([sys.executable, "-c", _ENGINE_CODE.format(want=want)], env=env, cwd=root,
                       capture_output=True, text=True, timeout=600)
    if r.returncode == 3:
        pytest.skip(f"this CPU has no {engine} engine: LLMCORE_CPU_GEMM={engine} runs {r.stdout.split()[-1]}")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


def test_cpu_gemm_env_is_checked():
    import os
    import subprocess
    import sys
    env = dict(os.environ, LLMCORE_CPU_GEMM="amx512")
    r = subprocess.run([sys.executable, "-c", "import llmcore.ops"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "LLMCORE_CPU_GEMM must be one of" in r.stderr
