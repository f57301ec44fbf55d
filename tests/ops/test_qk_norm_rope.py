"""qk_norm_rope / qk_norm_rope_ against the unfused fp64 reference (rms_norm then rope), an
independent implementation (F.rms_norm + HF rotate_half / complex rotation), and their contracts."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import llmcore.ops as lo
from tests.conftest import DEVICES, DTYPES, assert_close, make

# (B, S, Hq, Hkv, D): GQA, MQA, MHA, odd S, D in {64, 128, 80, 8, 18} (80: D/2 = 40 not a power of 2;
# 18: D/2 odd)
SHAPES = [(2, 7, 4, 2, 64), (1, 1, 8, 8, 128), (3, 5, 6, 1, 80), (1, 33, 2, 2, 8), (2, 3, 3, 1, 18)]
MAX_SEQ = 96
EPS = 1e-6


def _positions(form, B, S, device):
    if form == "none":
        return None
    if form == "offset":
        return 9
    if form == "packed":  # two documents per row restarting at 0; int32 on purpose
        cut = max(1, S // 2)
        row = torch.cat([torch.arange(cut), torch.arange(S - cut)]).to(torch.int32)
        return torch.stack([row + b for b in range(B)]).to(device)
    if form == "shared":  # (1, S) broadcast over B, int64
        return (torch.arange(S) * 3 % MAX_SEQ)[None].to(device)
    raise AssertionError(form)


def _weights(D, wdtype, device, grad=True):
    qw = (1.0 + 0.5 * make((D,), torch.float32, device)).to(wdtype).requires_grad_(grad)
    kw = (1.0 + 0.5 * make((D,), torch.float32, device)).to(wdtype).requires_grad_(grad)
    return qw, kw


def _torch_lowp(q, k, qw, kw, cos, sin, eps, positions, interleaved):
    """The unfused computation in q's own dtype (rms_norm rounded, then rope in that dtype): the
    low-precision baseline of the tolerance rule."""
    S = q.shape[1]
    if positions is None or not isinstance(positions, torch.Tensor):
        pos = (torch.arange(S, device=q.device) + (positions or 0))[None]
    else:
        pos = positions.long()
    c, s = cos[pos].to(q.dtype)[:, :, None], sin[pos].to(q.dtype)[:, :, None]

    def one(x, w):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.to(x.dtype)
        h = x.shape[-1] // 2
        x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., :h], x[..., h:])
        y1, y2 = x1 * c - x2 * s, x2 * c + x1 * s
        return torch.stack((y1, y2), -1).flatten(-2) if interleaved else torch.cat((y1, y2), -1)

    return one(q, qw), one(k, kw)


def _check_fwd_bwd(q, k, qw, kw, cos, sin, positions, interleaved, eps=EPS):
    dtype, device = q.dtype, q.device
    qo, ko = lo.qk_norm_rope(q, k, qw, kw, cos, sin, eps, positions=positions, interleaved=interleaved)
    dqo, dko = make(qo.shape, dtype, device), make(ko.shape, dtype, device)
    grads = torch.autograd.grad((qo, ko), (q, k, qw, kw), (dqo, dko))

    ins64 = [t.detach().double().requires_grad_() for t in (q, k, qw, kw)]
    qr, kr = lo.qk_norm_rope_reference(*ins64, cos, sin, eps, positions, interleaved)
    grads64 = torch.autograd.grad((qr, kr), ins64, (dqo.double(), dko.double()))
    insb = [t.detach().clone().requires_grad_() for t in (q, k, qw, kw)]
    qb, kb = _torch_lowp(*insb, cos, sin, eps, positions, interleaved)
    gradsb = torch.autograd.grad((qb, kb), insb, (dqo, dko))

    assert qo.dtype == dtype and ko.dtype == dtype and qo.is_contiguous() and ko.is_contiguous()
    assert_close(qo, qr, qb, name="q_out")
    assert_close(ko, kr, kb, name="k_out")
    for g, g64, gb, name in zip(grads, grads64, gradsb, ("dq", "dk", "dq_weight", "dk_weight")):
        # dweights sum over B*S*H rows: the rule holds against the same-dtype baseline's error
        assert_close(g, g64, gb, name=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("pos_form", ["none", "offset", "packed", "shared"])
@pytest.mark.parametrize("shape", SHAPES)
def test_qk_norm_rope_forward_backward(device, dtype, interleaved, pos_form, shape):
    B, S, Hq, Hk, D = shape
    cos, sin = lo.rope_cache(MAX_SEQ, D, theta=1e4, device=device)
    q = make((B, S, Hq, D), dtype, device, requires_grad=True)
    k = make((B, S, Hk, D), dtype, device, requires_grad=True)
    qw, kw = _weights(D, dtype, device)
    _check_fwd_bwd(q, k, qw, kw, cos, sin, _positions(pos_form, B, S, device), interleaved)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_master_weights(device, dtype):
    """fp32 weights next to 16-bit q/k (the model's RMSNorm weights under autocast): dweights fp32."""
    B, S, Hq, Hk, D = 2, 9, 4, 2, 128
    cos, sin = lo.rope_cache(MAX_SEQ, D, device=device)
    q = make((B, S, Hq, D), dtype, device, requires_grad=True)
    k = make((B, S, Hk, D), dtype, device, requires_grad=True)
    qw, kw = _weights(D, torch.float32, device)
    qo, ko = lo.qk_norm_rope(q, k, qw, kw, cos, sin)
    _, _, dqw, dkw = torch.autograd.grad((qo, ko), (q, k, qw, kw), (torch.ones_like(qo), torch.ones_like(ko)))
    assert dqw.dtype == torch.float32 and dkw.dtype == torch.float32
    _check_fwd_bwd(q, k, qw, kw, cos, sin, None, False)


def test_only_one_output_used():
    """A loss on q_out alone: autograd passes None for dk_out; k, k_weight get zero gradients."""
    B, S, Hq, Hk, D = 2, 5, 4, 2, 64
    cos, sin = lo.rope_cache(16, D)
    q = make((B, S, Hq, D), torch.float32, "cpu", requires_grad=True)
    k = make((B, S, Hk, D), torch.float32, "cpu", requires_grad=True)
    qw, kw = _weights(D, torch.float32, "cpu")
    qo, _ = lo.qk_norm_rope(q, k, qw, kw, cos, sin)
    dq, dk, dqw, dkw = torch.autograd.grad((qo * qo).sum(), (q, k, qw, kw))
    ins = [t.detach().double().requires_grad_() for t in (q, k, qw, kw)]
    qr, _ = lo.qk_norm_rope_reference(*ins, cos, sin)
    for a, b in zip((dq, dqw), torch.autograd.grad((qr * qr).sum(), (ins[0], ins[2]))):
        assert_close(a, b)
    assert torch.equal(dk, torch.zeros_like(dk)) and torch.equal(dkw, torch.zeros_like(dkw))


def test_reference_matches_independent_implementation():
    """The fp64 reference against F.rms_norm + HF's rotate_half (half-split) and a complex
    multiplication (interleaved, Meta's form): the oracle cannot share a bug with the kernel."""
    B, S, Hq, Hk, D = 2, 13, 4, 2, 64
    cos, sin = lo.rope_cache(64, D, theta=1e6)
    q, k = make((B, S, Hq, D), torch.float64, "cpu"), make((B, S, Hk, D), torch.float64, "cpu")
    qw, kw = _weights(D, torch.float64, "cpu", grad=False)
    pos = torch.stack([torch.arange(S), torch.arange(S) + 20])

    def norm(x, w):
        return F.rms_norm(x, (D,), w, EPS)

    c, s = cos[pos].double()[:, :, None], sin[pos].double()[:, :, None]  # (B, S, 1, D/2)
    cc, ss = torch.cat((c, c), -1), torch.cat((s, s), -1)

    def rotate_half(x):
        return torch.cat((-x[..., D // 2:], x[..., : D // 2]), -1)

    for x, w, out in zip((q, k), (qw, kw), lo.qk_norm_rope_reference(q, k, qw, kw, cos, sin, EPS, pos, False)):
        n = norm(x, w)
        torch.testing.assert_close(out, n * cc + rotate_half(n) * ss, rtol=1e-12, atol=1e-12)
    rot = torch.complex(c, s)  # exp(i * angle) from the same tables
    for x, w, out in zip((q, k), (qw, kw), lo.qk_norm_rope_reference(q, k, qw, kw, cos, sin, EPS, pos, True)):
        n = torch.view_as_complex(norm(x, w).reshape(*x.shape[:-1], D // 2, 2).contiguous())
        torch.testing.assert_close(out, torch.view_as_real(n * rot).flatten(-2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("interleaved", [False, True])
def test_fused_equals_unfused_llmcore_ops_fp32(interleaved):
    """In fp32 the fused op equals rope(rms_norm(q), rms_norm(k)) of the separate llmcore kernels."""
    B, S, Hq, Hk, D = 2, 17, 8, 2, 128
    cos, sin = lo.rope_cache(64, D)
    q, k = make((B, S, Hq, D), torch.float32, "cpu"), make((B, S, Hk, D), torch.float32, "cpu")
    qw, kw = _weights(D, torch.float32, "cpu", grad=False)
    a = lo.qk_norm_rope(q, k, qw, kw, cos, sin, EPS, positions=3, interleaved=interleaved)
    b = lo.rope(lo.rms_norm(q, qw, EPS), lo.rms_norm(k, kw, EPS), cos, sin, positions=3, interleaved=interleaved)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_strided_qkv_views(device, dtype, interleaved):
    """q and k sliced out of one fused qkv projection (strided in B, S, read in place), a (B, H, S, D)
    tensor transposed to (B, S, H, D), and an odd element offset."""
    B, S, Hq, Hk, D = 2, 11, 4, 2, 80
    cos, sin = lo.rope_cache(64, D, device=device)
    qkv = make((B, S, (Hq + 2 * Hk) * D), dtype, device, requires_grad=True)
    q = qkv[..., : Hq * D].view(B, S, Hq, D)
    k = qkv[..., Hq * D: (Hq + Hk) * D].view(B, S, Hk, D)
    assert not q.is_contiguous() and not k.is_contiguous()
    qw, kw = _weights(D, dtype, device)
    _check_fwd_bwd(q, k, qw, kw, cos, sin, 3, interleaved)
    # bit-exact against the same values made contiguous
    a = lo.qk_norm_rope(q, k, qw, kw, cos, sin, positions=3, interleaved=interleaved)
    b = lo.qk_norm_rope(q.contiguous(), k.contiguous(), qw, kw, cos, sin, positions=3, interleaved=interleaved)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    qt = make((B, Hq, S, D), dtype, device, requires_grad=True).transpose(1, 2)
    kt = make((B, Hk, S, D), dtype, device, requires_grad=True).transpose(1, 2)
    _check_fwd_bwd(qt, kt, qw, kw, cos, sin, None, interleaved)
    base = make((B, S, Hq * D + 1), dtype, device, requires_grad=True)
    _check_fwd_bwd(base[..., 1:].view(B, S, Hq, D), make((B, S, Hk, D), dtype, device, requires_grad=True), qw, kw,
                   cos, sin, None, interleaved)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_last_dim_is_copied(device):
    cos, sin = lo.rope_cache(16, 32, device=device)
    q = make((2, 5, 3, 64), torch.float32, device)[..., ::2]
    k = make((2, 5, 1, 32), torch.float32, device)
    qw, kw = _weights(32, torch.float32, device, grad=False)
    for a, b in zip(lo.qk_norm_rope(q, k, qw, kw, cos, sin), lo.qk_norm_rope_reference(q, k, qw, kw, cos, sin)):
        assert_close(a, b)
    with pytest.raises(RuntimeError, match="'q' must have unit stride"):
        lo.qk_norm_rope_(q, k, qw, kw, cos, sin)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_inplace_on_fused_qkv(device, dtype, interleaved):
    """Decode form: q, k views of one qkv buffer overwritten with exactly qk_norm_rope's output; v
    untouched."""
    B, S, Hq, Hk, D = 2, 6, 4, 2, 64
    cos, sin = lo.rope_cache(32, D, device=device)
    qkv = make((B, S, (Hq + 2 * Hk) * D), dtype, device)
    before = qkv.clone()
    q = qkv[..., : Hq * D].view(B, S, Hq, D)
    k = qkv[..., Hq * D: (Hq + Hk) * D].view(B, S, Hk, D)
    qw, kw = _weights(D, torch.float32 if dtype != torch.float32 else dtype, device, grad=False)
    pos = torch.tensor([[5, 6, 7, 0, 1, 2]] * B, device=device)
    expect_q, expect_k = lo.qk_norm_rope(q.clone(), k.clone(), qw, kw, cos, sin, positions=pos, interleaved=interleaved)
    rq, rk = lo.qk_norm_rope_(q, k, qw, kw, cos, sin, positions=pos, interleaved=interleaved)
    assert rq is q and rk is k
    assert torch.equal(q, expect_q) and torch.equal(k, expect_k)
    assert torch.equal(qkv[..., (Hq + Hk) * D:], before[..., (Hq + Hk) * D:]), "v must be untouched"


def test_inplace_errors():
    cos, sin = lo.rope_cache(8, 16)
    qw, kw = _weights(16, torch.float32, "cpu", grad=False)
    q, k = torch.randn(1, 4, 2, 16, requires_grad=True), torch.randn(1, 4, 1, 16)
    with pytest.raises(RuntimeError, match="inference only"):
        lo.qk_norm_rope_(q, k, qw, kw, cos, sin)
    with torch.no_grad():
        lo.qk_norm_rope_(q, k, qw, kw, cos, sin)
    x = torch.randn(1, 4, 2, 16)
    with pytest.raises(RuntimeError, match="overlap in memory"):
        lo.qk_norm_rope_(x, x, qw, kw, cos, sin)
    with pytest.raises(RuntimeError, match="internal memory overlap"):
        lo.qk_norm_rope_(torch.randn(1, 1, 2, 16).expand(3, 4, 2, 16), torch.randn(3, 4, 1, 16), qw, kw, cos, sin)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_inf_propagation(device, dtype):
    """A NaN or inf in one head row poisons exactly what the reference poisons (that row's outputs;
    the other rows stay exact)."""
    B, S, Hq, Hk, D = 1, 4, 3, 2, 64
    cos, sin = lo.rope_cache(16, D, device=device)
    q, k = make((B, S, Hq, D), dtype, device), make((B, S, Hk, D), dtype, device)
    q[0, 1, 2, 5] = float("nan")
    k[0, 3, 0, 40] = float("inf")
    qw, kw = _weights(D, dtype, device, grad=False)
    qo, ko = lo.qk_norm_rope(q, k, qw, kw, cos, sin)
    qr, kr = lo.qk_norm_rope_reference(q.double(), k.double(), qw.double(), kw.double(), cos, sin)
    assert torch.isnan(qo[0, 1, 2]).all() and torch.isnan(ko[0, 3, 0]).any()
    assert torch.isfinite(qo[0, 0]).all() and torch.isfinite(ko[0, :3]).all()
    assert torch.equal(torch.isnan(qo.cpu()), torch.isnan(qr.cpu())) and torch.equal(torch.isnan(ko.cpu()), torch.isnan(kr.cpu()))
    fin = torch.isfinite(qr.cpu())
    assert_close(qo.cpu()[fin], qr[fin].to(torch.float64), name="q_out finite part",
                 rtol=None if dtype == torch.float32 else 4 * torch.finfo(dtype).eps)


def test_bad_inputs_name_the_argument():
    D = 16
    cos, sin = lo.rope_cache(8, D)
    q, k = torch.randn(1, 4, 2, D), torch.randn(1, 4, 1, D)
    qw, kw = torch.ones(D), torch.ones(D)
    cases = [
        ((q, k, torch.ones(D + 2), kw, cos, sin), "'q_weight'"),
        ((q, k, qw, torch.ones(D, dtype=torch.float64), cos, sin), "'k_weight'"),
        ((q, k.double(), qw, kw, cos, sin), "'k'"),
        ((q, k, qw, kw, cos.double(), sin), "'cos'"),
        ((q, k, qw, kw, cos, sin[:, :4]), "'sin'"),
        ((q[..., :15], k[..., :15], qw[:15], kw[:15], cos, sin), "even"),
        ((q, torch.randn(2, 4, 1, D), qw, kw, cos, sin), "must agree in B, S and D"),
        ((q[0], k, qw, kw, cos, sin), "'q'"),
        ((q.int(), k, qw, kw, cos, sin), "'q'"),
    ]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            lo.qk_norm_rope(*args)
    with pytest.raises(RuntimeError, match="'positions'"):
        lo.qk_norm_rope(q, k, qw, kw, cos, sin, positions=torch.tensor([[0, 1, 2, 8]]))
    with pytest.raises(RuntimeError, match="exceed the cos/sin tables"):
        lo.qk_norm_rope(q, k, qw, kw, cos, sin, positions=5)
    with pytest.raises(RuntimeError, match="'eps'"):
        lo.qk_norm_rope(q, k, qw, kw, cos, sin, eps=0.0)
    with pytest.raises(TypeError, match="positions"):
        lo.qk_norm_rope(q, k, qw, kw, cos, sin, positions=1.5)


@pytest.mark.parametrize("device", DEVICES)
def test_empty(device):
    cos, sin = lo.rope_cache(8, 16, device=device)
    qw, kw = _weights(16, torch.float32, device)
    q = torch.randn(0, 4, 2, 16, device=device, requires_grad=True)
    k = torch.randn(0, 4, 1, 16, device=device, requires_grad=True)
    qo, ko = lo.qk_norm_rope(q, k, qw, kw, cos, sin)
    assert qo.shape == q.shape and ko.shape == k.shape
    dq, dk, dqw, dkw = torch.autograd.grad((qo.sum() + ko.sum()), (q, k, qw, kw))
    assert dq.shape == q.shape and torch.equal(dqw, torch.zeros_like(dqw))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(device, dtype):
    B, S, Hq, Hk, D = 2, 5, 4, 2, 32
    cos, sin = lo.rope_cache(16, D, device=device)
    q, k = make((B, S, Hq, D), dtype, device, requires_grad=True), make((B, S, Hk, D), dtype, device, requires_grad=True)
    qw, kw = _weights(D, dtype, device)
    pos = torch.randint(0, 16, (B, S), device=device)
    for positions, offset in ((None, 3), (pos, 0)):
        for il in (False, True):
            torch.library.opcheck(torch.ops.llmcore.qk_norm_rope_fwd.default,
                                  (q, k, qw, kw, cos, sin, positions, offset, il, 1e-6))
    _, _, qr, kr = torch.ops.llmcore.qk_norm_rope_fwd(q.detach(), k.detach(), qw.detach(), kw.detach(), cos, sin, None, 0,
                                                      False, 1e-6)
    torch.library.opcheck(torch.ops.llmcore.qk_norm_rope_bwd.default,
                          (make(q.shape, dtype, device), make(k.shape, dtype, device), q.detach(), k.detach(),
                           qw.detach(), kw.detach(), qr, kr, cos, sin, pos, 0, True))
    torch.library.opcheck(torch.ops.llmcore.qk_norm_rope_.default,
                          (q.detach().clone(), k.detach().clone(), qw.detach(), kw.detach(), cos, sin, None, 2, False, 1e-6))


@pytest.mark.parametrize("interleaved", [False, True])
def test_gradcheck_float64(interleaved):
    B, S, Hq, Hk, D = 2, 3, 2, 1, 8
    cos, sin = lo.rope_cache(8, D, theta=1e2)
    q, k = make((B, S, Hq, D), torch.float64, "cpu", requires_grad=True), make((B, S, Hk, D), torch.float64, "cpu", requires_grad=True)
    qw, kw = _weights(D, torch.float64, "cpu")
    pos = torch.tensor([[3, 0, 1], [5, 6, 7]])
    assert torch.autograd.gradcheck(
        lambda a, b, c, d: lo.qk_norm_rope(a, b, c, d, cos, sin, 1e-6, positions=pos, interleaved=interleaved),
        (q, k, qw, kw))


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), S=st.integers(1, 9), Hk=st.integers(1, 3), group=st.integers(1, 3),
       half=st.integers(1, 40), interleaved=st.booleans(), offset=st.integers(0, 6))
def test_shapes_hypothesis(B, S, Hk, group, half, interleaved, offset):
    """fp32 forward and backward against the fp64 reference over random shapes (any even D)."""
    D, Hq = 2 * half, Hk * group
    cos, sin = lo.rope_cache(16, D, theta=1e4)
    q = make((B, S, Hq, D), torch.float32, "cpu", requires_grad=True)
    k = make((B, S, Hk, D), torch.float32, "cpu", requires_grad=True)
    qw, kw = _weights(D, torch.float32, "cpu")
    _check_fwd_bwd(q, k, qw, kw, cos, sin, offset, interleaved)
