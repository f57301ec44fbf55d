"""swiglu / swiglu_packed against their fp32 references (tests/conftest.py's tolerance rule)."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import llmcore.ops as lo
from tests.conftest import DEVICES, DTYPES, assert_close, make

SHAPES = [(1, 1), (7, 33), (127, 64), (3, 5, 1025), (16, 1408), (2, 9, 511), (1, 8)]


def _torch_lowp_swiglu(gate, up):
    """What PyTorch computes in the inputs' own dtype: the low-precision baseline."""
    return F.silu(gate) * up


def _check(fn_ours, fn_ref, fn_base, inputs, dy, names):
    out = fn_ours(*inputs)
    grads = torch.autograd.grad(out, inputs, dy)
    ref_in = [t.detach().float().requires_grad_() for t in inputs]
    ref = fn_ref(*ref_in)
    grads_r = torch.autograd.grad(ref, ref_in, dy.float())
    base_in = [t.detach().clone().requires_grad_() for t in inputs]
    base = fn_base(*base_in)
    grads_b = torch.autograd.grad(base, base_in, dy)
    assert out.dtype == inputs[0].dtype and out.is_contiguous()
    assert_close(out, ref, base, name="y")
    for g, gr, gb, nm in zip(grads, grads_r, grads_b, names):
        assert g.dtype == inputs[0].dtype
        assert_close(g, gr, gb, name=nm)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_forward_backward(device, dtype, shape):
    gate = make(shape, dtype, device, seed=1, scale=3.0, requires_grad=True)
    up = make(shape, dtype, device, seed=2, requires_grad=True)
    _check(lo.swiglu, lo.swiglu_reference, _torch_lowp_swiglu, (gate, up), make(shape, dtype, device), ("dgate", "dup"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_packed_forward_backward(device, dtype, shape):
    gu = make((*shape[:-1], 2 * shape[-1]), dtype, device, seed=3, scale=3.0, requires_grad=True)

    def lowp(x):
        g, u = x.chunk(2, -1)
        return _torch_lowp_swiglu(g, u)

    _check(lo.swiglu_packed, lo.swiglu_packed_reference, lowp, (gu,), make(shape, dtype, device), ("dgate_up",))
    # the packed result equals the unpacked op on the two halves, bit for bit
    g, u = gu.detach().chunk(2, -1)
    assert torch.equal(lo.swiglu_packed(gu.detach()), lo.swiglu(g.contiguous(), u.contiguous()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_strided_inputs(device, dtype):
    base = make((12, 3 * 96), dtype, device, requires_grad=True)
    gate, up = base[:, 8:104], base[:, 150:246]  # row stride 288, unit column stride: read in place
    _check(lo.swiglu, lo.swiglu_reference, _torch_lowp_swiglu, (gate, up), make((12, 96), dtype, device),
           ("dgate", "dup"))
    gt = make((40, 12), dtype, device, requires_grad=True).t()  # column stride != 1: copied
    ut = make((12, 40), dtype, device, requires_grad=True)      # contiguous next to a strided gate
    _check(lo.swiglu, lo.swiglu_reference, _torch_lowp_swiglu, (gt, ut), make((12, 40), dtype, device),
           ("dgate", "dup"))
    gu = make((4, 6, 2 * 66), dtype, device, requires_grad=True)[:, ::2]  # strided rows, packed

    def lowp(x):
        g, u = x.chunk(2, -1)
        return _torch_lowp_swiglu(g, u)

    _check(lo.swiglu_packed, lo.swiglu_packed_reference, lowp, (gu,), make((4, 3, 66), dtype, device), ("dgate_up",))
    gu_t = make((2 * 10, 7), dtype, device, requires_grad=True).t()  # (7, 20) with column stride 7: copied
    _check(lo.swiglu_packed, lo.swiglu_packed_reference, lowp, (gu_t,), make((7, 10), dtype, device), ("dgate_up",))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_large_values(device, dtype):
    """|gate| far beyond 20 (exp overflows fp32 past 88): no NaN, the limits are right."""
    vals = torch.tensor([-1e4, -500., -100., -88.5, -87.5, -60., -30., -20.5, 20.5, 30., 60., 87.5, 88.5, 100., 500., 1e4])
    if dtype == torch.float16:
        vals = vals.clamp(-6e4, 6e4)
    gate = vals.repeat(9, 1).to(dtype).to(device).requires_grad_()
    up = make(gate.shape, dtype, device, seed=4, requires_grad=True)
    dy = make(gate.shape, dtype, device, seed=5)
    _check(lo.swiglu, lo.swiglu_reference, _torch_lowp_swiglu, (gate, up), dy, ("dgate", "dup"))
    y = lo.swiglu(gate, up)
    assert torch.isfinite(y).all()
    big = gate.detach() > 20
    assert_close(y[big], (gate.detach()[big].float() * up.detach()[big].float()).to(dtype), rtol=1e-2, name="y ~ g*u")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_inf_nan_propagation(device, dtype):
    """inf / -inf / NaN in gate, up or dy come out exactly where PyTorch's F.silu(g) * u (and its
    autograd) puts them, PyTorch computing in fp32 as the kernels do (in fp16 PyTorch's own silu(-30)
    underflows to -0 before the multiply, so -0 * inf = NaN there, while fp32 math gives -inf)."""
    special = [float("inf"), float("-inf"), float("nan"), 0.0, 1.5, -2.0, 30.0, -30.0]
    g, u = torch.meshgrid(torch.tensor(special), torch.tensor(special), indexing="ij")
    gate = g.reshape(-1).to(dtype).to(device).requires_grad_()
    up = u.reshape(-1).to(dtype).to(device).requires_grad_()
    for dy in (torch.ones_like(gate), torch.tensor(special * len(special), dtype=dtype, device=device)):
        y = lo.swiglu(gate, up)
        dg, du = torch.autograd.grad(y, (gate, up), dy)
        gr, ur = gate.detach().float().requires_grad_(), up.detach().float().requires_grad_()
        yr = F.silu(gr) * ur  # PyTorch itself, in fp32
        dgr, dur = torch.autograd.grad(yr, (gr, ur), dy.float())
        yr, dgr, dur = yr.to(dtype), dgr.to(dtype), dur.to(dtype)
        for a, b, nm in ((y, yr, "y"), (dg, dgr, "dgate"), (du, dur, "dup")):
            a, b = a.detach().double().cpu(), b.detach().double().cpu()
            assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{nm}: NaN pattern differs from PyTorch"
            assert torch.equal(torch.isinf(a), torch.isinf(b)) and torch.equal(a[torch.isinf(a)], b[torch.isinf(b)]), \
                f"{nm}: inf pattern differs from PyTorch"
        gu = torch.cat([gate.detach(), up.detach()])[None]
        assert torch.equal(torch.isnan(lo.swiglu_packed(gu)[0]), torch.isnan(yr.detach()))


@pytest.mark.parametrize("device", DEVICES)
def test_swiglu_empty(device):
    for shape in ((0, 64), (4, 0), (0,)):
        g = torch.empty(shape, device=device)
        assert lo.swiglu(g, g).shape == shape
    assert lo.swiglu_packed(torch.empty(0, 64, device=device)).shape == (0, 32)
    assert lo.swiglu_packed(torch.empty(3, 0, device=device)).shape == (3, 0)
    gu = torch.empty(0, 8, device=device, requires_grad=True)
    (d,) = torch.autograd.grad(lo.swiglu_packed(gu).sum(), gu)
    assert d.shape == (0, 8)


def test_swiglu_bad_input_errors():
    g, u = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="'up' must have shape"):
        lo.swiglu(g, torch.randn(4, 9))
    with pytest.raises(RuntimeError, match="'gate' and 'up' must have the same dtype"):
        lo.swiglu(g, u.double())
    with pytest.raises(RuntimeError, match="'gate' must be float32"):
        lo.swiglu(g.int(), u.int())
    with pytest.raises(RuntimeError, match="'gate' must have at least 1 dimension"):
        lo.swiglu(torch.tensor(1.0), torch.tensor(2.0))
    with pytest.raises(RuntimeError, match="'gate_up' must have an even last dimension"):
        lo.swiglu_packed(torch.randn(4, 7))
    with pytest.raises(RuntimeError, match="'gate_up' must be float32"):
        lo.swiglu_packed(torch.randn(4, 8).long())
    with pytest.raises(RuntimeError, match="'dy' must have shape"):
        torch.ops.llmcore.swiglu_packed_bwd(torch.randn(4, 8), torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="'dy' must have shape"):
        torch.ops.llmcore.swiglu_bwd(torch.randn(4, 7), g, u)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_swiglu_device_mix_error():
    with pytest.raises(RuntimeError, match="same device"):
        lo.swiglu(torch.randn(4, 8, device="cuda"), torch.randn(4, 8))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_opcheck(device, dtype):
    g, u, dy = make((5, 40), dtype, device), make((5, 40), dtype, device), make((5, 40), dtype, device)
    gu = make((5, 80), dtype, device)
    ops = torch.ops.llmcore
    torch.library.opcheck(ops.swiglu_fwd.default, (g.clone().requires_grad_(), u.clone().requires_grad_()))
    torch.library.opcheck(ops.swiglu_bwd.default, (dy, g, u))
    torch.library.opcheck(ops.swiglu_packed_fwd.default, (gu.clone().requires_grad_(),))
    torch.library.opcheck(ops.swiglu_packed_bwd.default, (dy, gu))


def test_swiglu_gradcheck_float64():
    g = make((6, 19), torch.float64, "cpu", scale=3.0, requires_grad=True)
    u = make((6, 19), torch.float64, "cpu", requires_grad=True)
    gu = make((3, 2, 14), torch.float64, "cpu", scale=3.0, requires_grad=True)
    assert torch.autograd.gradcheck(lo.swiglu, (g, u))
    assert torch.autograd.gradcheck(lo.swiglu_packed, (gu,))


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(0, 40), n=st.integers(1, 300), dt=st.sampled_from(DTYPES), packed=st.booleans())
def test_swiglu_hypothesis_shapes(rows, n, dt, packed):
    if packed:
        gu = make((rows, 2 * n), dt, "cpu", scale=3.0)
        g, u = gu.chunk(2, -1)
        got = lo.swiglu_packed(gu)
    else:
        g, u = make((rows, n), dt, "cpu", scale=3.0), make((rows, n), dt, "cpu")
        got = lo.swiglu(g, u)
    assert_close(got, lo.swiglu_reference(g.float(), u.float()), _torch_lowp_swiglu(g, u))


def test_swiglu_torch_compile_fullgraph():
    def f(g, u, gu):
        return lo.swiglu(g, u) * 2 + lo.swiglu_packed(gu)

    g, u, gu = (make(s, torch.float32, "cpu", requires_grad=True) for s in ((4, 32), (4, 32), (4, 64)))
    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    out, ref = compiled(g, u, gu), f(g, u, gu)
    assert_close(out, ref.detach())
    for a, b in zip(torch.autograd.grad(out.sum(), (g, u, gu)), torch.autograd.grad(ref.sum(), (g, u, gu))):
        assert_close(a, b)


def test_swiglu_reference_backend_switch():
    g, u = make((3, 16), torch.float32, "cpu"), make((3, 16), torch.float32, "cpu")
    lo.set_backend("reference")
    try:
        assert torch.equal(lo.swiglu(g, u), lo.swiglu_reference(g, u))
        gu = torch.cat([g, u], -1)
        assert torch.equal(lo.swiglu_packed(gu), lo.swiglu_packed_reference(gu))
    finally:
        lo.set_backend("llmcore")


# ---------------------------------------------------------------- the oracle itself
@pytest.mark.parametrize("shape", [(7, 33), (3, 5, 1025)])
def test_reference_matches_independent_fp64(shape):
    """swiglu_reference / swiglu_packed_reference against silu written out, g * sigmoid(g) * u,
    and F.silu(g) * u, in float64, forward and gradients; the packed form splits [gate | up]."""
    g, u = make(shape, torch.float64, "cpu", seed=1, scale=4.0), make(shape, torch.float64, "cpu", seed=2)
    g[..., :3] = torch.tensor([-80.0, 0.0, 80.0], dtype=torch.float64)  # saturated and zero gates
    g.requires_grad_(), u.requires_grad_()
    dy = make(shape, torch.float64, "cpu", seed=3)
    y = lo.swiglu_reference(g, u)
    for yi, nm in ((g * torch.sigmoid(g) * u, "g * sigmoid(g) * u"), (F.silu(g) * u, "F.silu(g) * u")):
        assert_close(y, yi, name=nm)
        for a, b, n in zip(torch.autograd.grad(y, (g, u), dy, retain_graph=True),
                           torch.autograd.grad(yi, (g, u), dy), ("dgate", "dup")):
            assert_close(a, b, name=f"{n} vs {nm}")
    gu = torch.cat([g, u], -1).detach().requires_grad_()
    yp = lo.swiglu_packed_reference(gu)
    F_ = shape[-1]
    assert_close(yp, F.silu(gu[..., :F_]) * gu[..., F_:], name="swiglu_packed_reference")
    (dgu,) = torch.autograd.grad(yp, gu, dy)
    gg, uu = gu.detach()[..., :F_], gu.detach()[..., F_:]
    sig = torch.sigmoid(gg)
    assert_close(dgu, torch.cat([dy * uu * sig * (1 + gg * (1 - sig)), dy * gg * sig], -1), name="dgate_up by hand")
