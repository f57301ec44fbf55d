"""fused_linear_cross_entropy against its reference in fp64 (tests/conftest.py's tolerance rule),
hand-written label smoothing / z-loss / softcap references, and the no-(N, V)-logits property."""
import pytest
import torch
import torch.nn.functional as F

import llmcore.ops as lo
from tests.conftest import DEVICES, DTYPES, assert_close, make

FLCE = lo.fused_linear_cross_entropy
REF = lo.fused_linear_cross_entropy_reference

# (N, H, V, chunk_rows): odd sizes, vocabularies that are not multiples of any chunk, N = 1,
# chunks smaller than N so chunk boundaries are crossed.
SHAPES = [(1, 16, 1199, 0), (7, 33, 50, 3), (37, 64, 6400, 16), (130, 24, 1025, 0), (5, 16, 50257, 2),
          (3, 8, 151936, 0), (64, 32, 257, 7)]


def _inputs(N, H, V, dtype, device, seed=0, ignore_frac=0.3, bias=False):
    h = make((N, H), dtype, device, seed=seed, requires_grad=True)
    w = make((V, H), dtype, device, seed=seed + 1, scale=H ** -0.5 * 2, requires_grad=True)
    g = torch.Generator().manual_seed(seed + 2)
    t = torch.randint(0, V, (N,), generator=g)
    t[torch.rand(N, generator=g) < ignore_frac] = -100
    if N > 1 and (t == -100).all():
        t[0] = 1
    b = make((V,), dtype, device, seed=seed + 3, requires_grad=True) if bias else None
    return h, w, t.to(device), b


def _torch_lowp(h, w, t, b=None, reduction="mean", label_smoothing=0.0):
    """PyTorch in the inputs' own dtype: the low-precision baseline."""
    return F.cross_entropy(F.linear(h, w, b), t, ignore_index=-100, reduction=reduction, label_smoothing=label_smoothing)


def _grads(loss, tensors, upstream=None):
    tensors = [x for x in tensors if x is not None]
    return torch.autograd.grad(loss, tensors, upstream)


def _check(h, w, t, b=None, reduction="mean", chunk_rows=0, vocab_chunk=0, **kw):
    ours = FLCE(h, w, t, b, reduction=reduction, chunk_rows=chunk_rows, vocab_chunk=vocab_chunk, **kw)
    up = None if reduction != "none" else make(t.shape, torch.float32, h.device, seed=9)
    gs = _grads(ours, (h, w, b), up)
    leaves = [x.detach().double().requires_grad_() if x is not None else None for x in (h, w, b)]
    ref = REF(leaves[0], leaves[1], t, leaves[2], reduction=reduction, **kw)
    gr = _grads(ref, leaves, None if up is None else up.double())
    base_in = [x.detach().clone().requires_grad_() if x is not None else None for x in (h, w, b)]
    if kw.get("z_loss") or kw.get("softcap"):
        base, gb = None, [None] * len(gs)
    else:
        base = _torch_lowp(*base_in[:2], t, base_in[2], reduction, kw.get("label_smoothing", 0.0))
        gb = _grads(base, base_in, None if up is None else up.to(h.dtype))
    loss_dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    assert ours.dtype == loss_dtype
    # the loss is fp32; against the low-precision baseline it is compared in the input dtype
    assert_close(ours.to(h.dtype), ref, base, name="loss")
    for g, r, bb, nm in zip(gs, gr, gb, ("dhidden", "dweight", "dbias")):
        assert g.dtype == h.dtype
        assert_close(g, r, bb, name=nm)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("order", ["rows", "vocab"])
def test_flce_forward_backward(device, dtype, shape, order):
    """Both loop orders: row chunks, and vocabulary blocks (vocab_chunk > 0; automatic for V > 2 N)
    with blocks that do not divide V."""
    N, H, V, chunk = shape
    h, w, t, _ = _inputs(N, H, V, dtype, device)
    _check(h, w, t, chunk_rows=chunk, vocab_chunk=0 if order == "rows" else V // 3 + 5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_flce_reductions(device, dtype, reduction):
    h, w, t, _ = _inputs(41, 32, 1199, dtype, device, seed=5)
    _check(h, w, t, reduction=reduction, chunk_rows=8)
    _check(h, w, t, reduction=reduction, chunk_rows=8, vocab_chunk=100)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_flce_bias_and_label_smoothing(device, dtype):
    h, w, t, b = _inputs(23, 40, 777, dtype, device, seed=7, bias=True)
    _check(h, w, t, b, label_smoothing=0.1, chunk_rows=5)
    _check(h, w, t, b, label_smoothing=0.1, chunk_rows=5, vocab_chunk=200)
    _check(h, w, t, b, reduction="none", label_smoothing=0.25, chunk_rows=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_flce_z_loss_softcap(device, dtype, reduction):
    if dtype == torch.float64 and device != "cpu":
        pytest.skip("float64 is CPU only")
    h, w, t, b = _inputs(19, 24, 513, dtype, device, seed=11, bias=True)
    with torch.no_grad():
        w.mul_(4)  # logits of a few units, so softcap=5 bends them
    _check(h, w, t, b, reduction=reduction, z_loss=1e-3, chunk_rows=4)
    _check(h, w, t, b, reduction=reduction, softcap=5.0, chunk_rows=4)
    _check(h, w, t, b, reduction=reduction, softcap=3.0, z_loss=0.01, label_smoothing=0.1)
    _check(h, w, t, b, reduction=reduction, softcap=3.0, z_loss=0.01, label_smoothing=0.1, vocab_chunk=77)


def _hand_loss(h, w, t, b=None, eps=0.0, zc=0.0, cap=None, reduction="mean"):
    """Written out in fp64: log-softmax by hand, smoothing as (1-eps) nll + eps mean(-log p)."""
    x = h.double() @ w.double().T + (0 if b is None else b.double())
    if cap is not None:
        x = cap * torch.tanh(x / cap)
    m = x.max(-1, keepdim=True).values
    lse = (m + (x - m).exp().sum(-1, keepdim=True).log()).squeeze(-1)
    logp = x - lse[:, None]
    valid = t != -100
    tt = t.clamp(min=0)
    nll = -logp.gather(1, tt[:, None]).squeeze(1)
    smooth = -logp.mean(-1)
    rows = ((1 - eps) * nll + eps * smooth + zc * lse * lse) * valid
    if reduction == "none":
        return rows
    return rows.sum() / max(int(valid.sum()), 1) if reduction == "mean" else rows.sum()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_flce_against_hand_written(reduction):
    h, w, t, b = _inputs(17, 20, 300, torch.float64, "cpu", seed=13, bias=True)
    for kw, hk in (({}, {}), ({"label_smoothing": 0.2}, {"eps": 0.2}), ({"z_loss": 1e-2}, {"zc": 1e-2}),
                   ({"softcap": 2.0}, {"cap": 2.0}), ({"label_smoothing": 0.1, "z_loss": 0.05, "softcap": 1.5},
                                                      {"eps": 0.1, "zc": 0.05, "cap": 1.5})):
        ref = _hand_loss(h, w, t, b, reduction=reduction, **hk)
        up = torch.randn(ref.shape, dtype=torch.float64)
        gr = _grads(ref, (h, w, b), up)
        for vc in (0, 41):
            ours = FLCE(h, w, t, b, reduction=reduction, chunk_rows=5, vocab_chunk=vc, **kw)
            assert_close(ours, ref, name=f"loss {kw}")
            for a, r, nm in zip(_grads(ours, (h, w, b), up), gr, ("dh", "dw", "db")):
                assert_close(a, r, name=f"{nm} {kw} vocab_chunk={vc}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_flce_all_ignored(device, reduction):
    h, w, _, b = _inputs(9, 16, 100, torch.float32, device, bias=True)
    t = torch.full((9,), -100, device=device)
    loss = FLCE(h, w, t, b, reduction=reduction)
    assert torch.isfinite(loss).all() and (loss == 0).all()
    up = torch.ones_like(loss)
    for g in _grads(loss, (h, w, b), up):
        assert torch.equal(g, torch.zeros_like(g))
    assert torch.equal(REF(h, w, t, b, reduction=reduction), loss)


@pytest.mark.parametrize("device", DEVICES)
def test_flce_custom_ignore_index_and_int32_target(device):
    h, w, t, _ = _inputs(20, 16, 97, torch.float32, device, seed=3, ignore_frac=0.0)
    t = t.clone()
    t[::3] = 5  # ignore_index = 5: every row with class 5 is dropped
    a = FLCE(h, w, t.int(), ignore_index=5)
    r = REF(h.double(), w.double(), t, ignore_index=5)
    assert_close(a, r)
    ga = _grads(a, (h, w))
    gr = torch.autograd.grad(F.cross_entropy(h @ w.T, t, ignore_index=5), (h, w))
    for x, y in zip(ga, gr):
        assert_close(x, y)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_flce_nan_propagation(device, dtype):
    h, w, t, _ = _inputs(12, 16, 300, dtype, device, seed=4, ignore_frac=0.0)
    t = t.clone()
    t[7] = -100
    with torch.no_grad():
        h[3, 2] = float("nan")  # a labelled row
        h[7, 0] = float("nan")  # an ignored row: contributes nothing
    loss = FLCE(h, w, t, reduction="none")
    assert torch.isnan(loss[3]) and torch.isfinite(loss[torch.arange(12) != 3]).all()
    for vc in (0, 64):
        dh, dw = _grads(FLCE(h, w, t, chunk_rows=4, vocab_chunk=vc), (h, w))
        assert torch.isnan(dh[3]).all() and torch.isnan(dw).all()
        assert torch.isfinite(dh[torch.arange(12) != 3]).all() and (dh[7] == 0).all()
    with torch.no_grad():
        h[3, 2] = 0.0
    loss = FLCE(h, w, t)
    assert torch.isfinite(loss)
    assert all(torch.isfinite(g).all() for g in _grads(loss, (h, w)))
    with torch.no_grad():
        w[5, 1] = float("inf")  # +inf / -inf logits: NaN / inf exactly where PyTorch has them
    for eps in (0.0, 0.1):
        ours = FLCE(h, w, t, reduction="none", label_smoothing=eps)
        ref = F.cross_entropy(h.detach().float() @ w.detach().float().T, t, reduction="none", label_smoothing=eps)
        assert torch.equal(torch.isnan(ours), torch.isnan(ref)), eps
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)), eps


def test_flce_target_out_of_range():
    h, w, t, _ = _inputs(6, 8, 50, torch.float32, "cpu", ignore_frac=0.0)
    for bad in (50, -1, 1000):
        t2 = t.clone()
        t2[4] = bad
        with pytest.raises(RuntimeError, match=f"'target' must hold class indices in \\[0, V = 50\\).*got {bad} at row 4"):
            FLCE(h, w, t2)
        with pytest.raises(ValueError, match="at row 4"):
            REF(h, w, t2)


def test_flce_bad_input_errors():
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    with pytest.raises(RuntimeError, match="'weight' must have shape \\(V, H\\) with H = hidden.size\\(1\\) = 8"):
        FLCE(h, torch.randn(10, 9), t)
    with pytest.raises(RuntimeError, match="'hidden' and 'weight' must have the same dtype"):
        FLCE(h, w.double(), t)
    with pytest.raises(RuntimeError, match="'target' must be int64 or int32"):
        FLCE(h, w, t.float())
    with pytest.raises(RuntimeError, match="'target' must have shape \\(N,\\)"):
        torch.ops.llmcore.fused_linear_cross_entropy_fwd(h, w, t[:3], None, -100, 0.0, 0.0, 0.0, "mean", False, 0, 0)
    with pytest.raises(RuntimeError, match="'bias' must have shape"):
        FLCE(h, w, t, torch.randn(9))
    with pytest.raises(RuntimeError, match="'hidden' must be float32"):
        FLCE(h.long(), w.long(), t)
    with pytest.raises(RuntimeError, match="'label_smoothing' must be in \\[0, 1\\]"):
        FLCE(h, w, t, label_smoothing=1.5)
    with pytest.raises(RuntimeError, match="'reduction' must be"):
        torch.ops.llmcore.fused_linear_cross_entropy_fwd(h, w, t, None, -100, 0.0, 0.0, 0.0, "avg", False, 0, 0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        FLCE(h, w, t, reduction="avg")
    with pytest.raises(ValueError, match="softcap must be > 0"):
        FLCE(h, w, t, softcap=0.0)
    with pytest.raises(RuntimeError, match="'grad_loss' must have shape \\(N,\\)"):
        torch.ops.llmcore.fused_linear_cross_entropy_bwd(torch.ones(3), h, w, t, None, -100, 0.0, 0.0, 0.0, "none", 0, 0)


@pytest.mark.parametrize("device", DEVICES)
def test_flce_empty(device):
    h = torch.empty(0, 8, device=device, requires_grad=True)
    w = make((10, 8), torch.float32, device, requires_grad=True)
    t = torch.empty(0, dtype=torch.long, device=device)
    loss = FLCE(h, w, t)
    assert loss.item() == 0.0
    dh, dw = _grads(loss, (h, w))
    assert dh.shape == (0, 8) and (dw == 0).all()
    assert FLCE(h, w, t, reduction="none").shape == (0,)


def test_flce_leading_dims():
    h, w, t, _ = _inputs(24, 16, 70, torch.float32, "cpu", seed=2)
    h3, t3 = h.detach().view(2, 12, 16), t.view(2, 12)
    assert FLCE(h3, w, t3, reduction="none").shape == (2, 12)
    assert_close(FLCE(h3, w, t3), REF(h3.double(), w.double(), t3))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_flce_opcheck(device, dtype):
    """Every dtype: both schemas once; float32: every mode (reductions, grads in the forward or not,
    bias or not, both loop orders, softcap)."""
    h, w, t, b = _inputs(11, 16, 70, dtype, device, seed=6, bias=True)
    ops = torch.ops.llmcore
    gl = make((11,), torch.float32, device)
    fwd = [(b, "mean", True, 4, 0, 0.0)]
    bwd = [(gl, b, "none", 3, 0)]
    if dtype == torch.float32:
        fwd += [(bias, red, cg, 4, vc, 0.0) for red, cg in (("mean", True), ("sum", True), ("mean", False), ("none", False))
                for bias in (None, b) for vc in (0, 16)] + [(b, "mean", True, 0, 0, 4.0)]
        bwd += [(gl, b, "none", 3, 32), (gl[0], None, "mean", 0, 0)]
    for bias, red, cg, rows, vc, cap in fwd:
        torch.library.opcheck(ops.fused_linear_cross_entropy_fwd.default,
                              (h, w, t, bias, -100, 0.1, 1e-3, cap, red, cg, rows, vc))
    for g, bias, red, rows, vc in bwd:
        torch.library.opcheck(ops.fused_linear_cross_entropy_bwd.default,
                              (g, h.detach(), w.detach(), t, None if bias is None else bias.detach(), -100, 0.1, 1e-3,
                               4.0, red, rows, vc))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_flce_gradcheck_float64(reduction):
    h, w, t, b = _inputs(7, 6, 13, torch.float64, "cpu", seed=8, bias=True)

    def f(h, w, b):
        return FLCE(h, w, t, b, reduction=reduction, label_smoothing=0.1, z_loss=0.01, softcap=2.0, chunk_rows=3)

    assert torch.autograd.gradcheck(f, (h, w, b))
    assert torch.autograd.gradcheck(lambda h, w, b: FLCE(h, w, t, b, reduction=reduction, label_smoothing=0.1,
                                                         z_loss=0.01, chunk_rows=3, vocab_chunk=5), (h, w, b))
    assert torch.autograd.gradcheck(lambda h, w: FLCE(h, w, t, reduction=reduction), (h, w))


def test_flce_saves_no_logits():
    """Nothing of size N x V is saved for backward (only the gradients / inputs), whatever the path."""
    N, H, V = 64, 16, 3000
    h, w, t, _ = _inputs(N, H, V, torch.float32, "cpu", seed=10)
    for reduction in ("mean", "none"):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
            loss = FLCE(h, w, t, reduction=reduction, chunk_rows=16)
        assert saved and max(saved) <= V * H, f"{reduction}: saved tensors of {max(saved)} elements (N x V = {N * V})"
        _grads(loss, (h, w), torch.ones_like(loss))
    saved = []  # the check can fail: the eager torch computation saves its (N, V) logits
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
        F.cross_entropy(h @ w.T, t)
    assert max(saved) >= N * V


def test_flce_torch_compile_fullgraph():
    h, w, t, b = _inputs(19, 16, 333, torch.float32, "cpu", seed=12, bias=True)

    def f(h, w, b):
        return FLCE(h, w, t, b, label_smoothing=0.05) * 2 + FLCE(h, w, t, reduction="none").sum()

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    out, ref = compiled(h, w, b), f(h, w, b)
    assert_close(out, ref.detach())
    for a, r in zip(_grads(out, (h, w, b)), _grads(ref, (h, w, b))):
        assert_close(a, r)


def test_flce_no_grad_and_partial_requires_grad():
    h, w, t, _ = _inputs(10, 8, 40, torch.float32, "cpu", seed=14)
    with torch.no_grad():
        assert_close(FLCE(h, w, t), REF(h.double(), w.double(), t))
    wd = w.detach()
    (dh,) = torch.autograd.grad(FLCE(h, wd, t), h)
    (dhr,) = torch.autograd.grad(F.cross_entropy(h @ wd.T, t), h)
    assert_close(dh, dhr)


def test_flce_reference_backend_switch():
    h, w, t, _ = _inputs(6, 8, 30, torch.float32, "cpu")
    lo.set_backend("reference")
    try:
        assert torch.equal(FLCE(h, w, t), REF(h, w, t))
    finally:
        lo.set_backend("llmcore")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reference_matches_independent_fp64(reduction):
    """The oracle against the hand-written fp64 loss (smoothing, z-loss, softcap, bias) and, for
    the plain case, F.cross_entropy itself."""
    h, w, t, b = _inputs(15, 12, 211, torch.float64, "cpu", seed=21, bias=True)
    for kw, hk in (({}, {}), ({"label_smoothing": 0.3, "z_loss": 0.02, "softcap": 2.5}, {"eps": 0.3, "zc": 0.02, "cap": 2.5})):
        assert_close(REF(h, w, t, b, reduction=reduction, **kw), _hand_loss(h, w, t, b, reduction=reduction, **hk))
    assert_close(REF(h, w, t, b, reduction=reduction, label_smoothing=0.2),
                 F.cross_entropy(h @ w.T + b, t, reduction=reduction, label_smoothing=0.2))
