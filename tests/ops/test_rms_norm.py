"""rms_norm / add_rms_norm against their fp32 references (tests/conftest.py's tolerance rule)."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import llmcore.ops as lo
from tests.conftest import DEVICES, DTYPES, assert_close, make

SHAPES = [(1, 1), (7, 33), (127, 64), (3, 5, 1025), (16, 4096), (2, 9, 511)]


def _torch_lowp_rms_norm(x, w, eps):
    """What PyTorch computes in the input's own dtype: the low-precision baseline."""
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), w.to(x.dtype), eps)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_forward_backward(device, dtype, shape):
    eps = 1e-6
    x = make(shape, dtype, device, requires_grad=True)
    w = make(shape[-1:], dtype, device, requires_grad=True)
    y = lo.rms_norm(x, w, eps)
    dy = make(shape, dtype, device)
    dx, dw = torch.autograd.grad(y, (x, w), dy)

    xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    yr = lo.rms_norm_reference(xr, wr, eps)
    dxr, dwr = torch.autograd.grad(yr, (xr, wr), dy.float())
    xb, wb = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    yb = _torch_lowp_rms_norm(xb, wb, eps)
    dxb, dwb = torch.autograd.grad(yb, (xb, wb), dy)

    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    assert_close(y, yr, yb, name="y")
    assert_close(dx, dxr, dxb, name="dx", atol=1e-4)
    # dweight sums over all rows: scale the fp32 tolerance with the row count
    assert_close(dw, dwr, dwb, name="dweight", atol=1e-4 * max(1, x.numel() // shape[-1]) ** 0.5)


# Rows past the CUDA kernels' register caches: the backward holds 4 vectors of x, dy and dweight per
# thread (~128-160 registers); launched with up to 1024 threads it failed ("too many resources
# requested") for bf16 rows > 16384, fp32 rows > 8192 and odd (unvectorized, 80-register) fp32
# rows > ~3200. Now its block is at most 384 threads (the tail past 12288 16-bit / 6144 fp32
# elements is uncached) and the forward's 1024. Vectorized and odd widths on both sides of each
# of those limits; a few rows, and more rows than the backward's persistent grid (the partials).
WIDE = [(torch.bfloat16, n) for n in (12288, 12296, 16384, 16392, 24576, 32768, 16385, 32767)] + \
       [(torch.float32, n) for n in (3199, 3201, 6144, 6148, 8192, 8196, 16384, 32768, 32765)] + \
       [(torch.float16, n) for n in (16392, 32768)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,n", WIDE)
@pytest.mark.parametrize("rows", [3, 1100])
def test_rms_norm_wide_rows(device, dtype, n, rows):
    if device == "cpu" and (rows > 3 or n not in (16392, 32767, 3201, 32765)):
        pytest.skip("the CPU kernel has no block-size limit: a few wide rows suffice")
    x = make((rows, n), dtype, device, requires_grad=True)
    r = make((rows, n), dtype, device, seed=1)
    w = make((n,), dtype, device, seed=2, requires_grad=True)
    y, h = lo.add_rms_norm(x, r, w)
    dy = make((rows, n), dtype, device, seed=3)
    dx, dw = torch.autograd.grad(y, (x, w), dy)

    xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    yr = lo.rms_norm_reference(xr + r.float(), wr)
    dxr, dwr = torch.autograd.grad(yr, (xr, wr), dy.float())
    xb, wb = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    yb = _torch_lowp_rms_norm(xb + r, wb, 1e-6)
    dxb, dwb = torch.autograd.grad(yb, (xb, wb), dy)
    assert_close(h, xr.detach() + r.float(), (x + r).detach(), name="h")
    assert_close(y, yr, yb, name="y")
    assert_close(dx, dxr, dxb, name="dx", atol=1e-4)
    assert_close(dw, dwr, dwb, name="dweight", atol=1e-4 * rows ** 0.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_fp32_weight_with_16bit_x(device, dtype):
    x = make((33, 257), dtype, device, requires_grad=True)
    w = make((257,), torch.float32, device, requires_grad=True)
    y = lo.rms_norm(x, w)
    assert y.dtype == dtype
    dx, dw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
    assert dw.dtype == torch.float32
    xr = x.detach().float().requires_grad_()
    wr = w.detach().clone().requires_grad_()
    yr = lo.rms_norm_reference(xr, wr)
    dxr, dwr = torch.autograd.grad(yr, (xr, wr), torch.ones_like(yr))
    xb = x.detach().clone().requires_grad_()
    yb = _torch_lowp_rms_norm(xb, w.detach(), 1e-6)
    (dxb,) = torch.autograd.grad(yb, (xb,), torch.ones_like(yb))
    assert_close(y, yr, yb, name="y")
    assert_close(dx, dxr, dxb, name="dx")
    assert_close(dw, dwr, atol=1e-4 * 33 ** 0.5, rtol=1e-4, name="dweight")  # fp32 sums over the 33 rows


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 8), (7, 33), (4, 3, 1025)])
def test_add_rms_norm(device, dtype, shape):
    x = make(shape, dtype, device, requires_grad=True)
    r = make(shape, dtype, device, requires_grad=True)
    w = make(shape[-1:], dtype, device, requires_grad=True)
    y, h = lo.add_rms_norm(x, r, w)
    dy, dh = make(shape, dtype, device), make(shape, dtype, device)
    grads = torch.autograd.grad((y, h), (x, r, w), (dy, dh))

    xr, rr, wr = (t.detach().float().requires_grad_() for t in (x, r, w))
    yr, hr = lo.rms_norm_reference(xr + rr, wr), xr + rr
    grads_r = torch.autograd.grad((yr, hr), (xr, rr, wr), (dy.float(), dh.float()))
    xb, rb, wb = (t.detach().clone().requires_grad_() for t in (x, r, w))
    hb = xb + rb
    yb = _torch_lowp_rms_norm(hb, wb, 1e-6)
    grads_b = torch.autograd.grad((yb, hb), (xb, rb, wb), (dy, dh))

    assert torch.equal(h, (x.detach().float() + r.detach().float()).to(dtype)), "h must be x + residual rounded once"
    assert_close(y, yr, yb, name="y")
    for g, gr, gb, nm in zip(grads, grads_r, grads_b, ("dx", "dresidual", "dweight")):
        assert_close(g, gr, gb, name=nm, atol=1e-4 * max(1, x.numel() // shape[-1]) ** 0.5)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs(device):
    base = make((12, 96), torch.float32, device)
    x = base[:, 16:80]                    # row stride 96, unit column stride: read in place
    xt = make((64, 12), torch.float32, device).t()  # column stride != 1: copied
    w = make((64,), torch.float32, device)
    for xi in (x, xt, make((4, 6, 64), torch.float32, device)[:, ::2]):
        assert_close(lo.rms_norm(xi, w), lo.rms_norm_reference(xi, w), name="y")
        y, h = lo.add_rms_norm(xi, xi, w)
        assert_close(y, lo.rms_norm_reference(xi + xi, w), name="y(add)")


@pytest.mark.parametrize("device", DEVICES)
def test_empty_rows(device):
    x = torch.empty(0, 64, device=device)
    w = make((64,), torch.float32, device)
    assert lo.rms_norm(x, w).shape == (0, 64)
    y, h = lo.add_rms_norm(x, x, w)
    assert y.shape == h.shape == (0, 64)


def test_bad_input_errors():
    x, w = torch.randn(4, 8), torch.randn(8)
    with pytest.raises(RuntimeError, match="'weight' must have shape"):
        lo.rms_norm(x, torch.randn(9))
    with pytest.raises(RuntimeError, match="'weight' must have x's dtype"):
        lo.rms_norm(x.bfloat16(), w.half())
    with pytest.raises(RuntimeError, match="'eps' must be > 0"):
        lo.rms_norm(x, w, 0.0)
    with pytest.raises(RuntimeError, match="'x' must be float32"):
        lo.rms_norm(x.int(), w)
    with pytest.raises(RuntimeError, match="'residual' must have shape"):
        lo.add_rms_norm(x, torch.randn(4, 9), w)
    with pytest.raises(RuntimeError, match="'x' and 'residual' must have the same dtype"):
        lo.add_rms_norm(x, x.double(), w)
    with pytest.raises(RuntimeError, match="non-empty last dimension"):
        lo.rms_norm(torch.randn(4, 0), torch.randn(0))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_mix_error():
    with pytest.raises(RuntimeError, match="same device"):
        lo.rms_norm(torch.randn(4, 8, device="cuda"), torch.randn(8))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(device, dtype):
    x, r, w = make((5, 40), dtype, device), make((5, 40), dtype, device), make((40,), dtype, device)
    rstd = torch.ops.llmcore.rms_norm_fwd(x, w, 1e-6)[1]
    torch.library.opcheck(torch.ops.llmcore.rms_norm_fwd.default, (x.requires_grad_(), w.requires_grad_(), 1e-6))
    torch.library.opcheck(torch.ops.llmcore.add_rms_norm_fwd.default, (x, r.requires_grad_(), w, 1e-6))
    torch.library.opcheck(torch.ops.llmcore.rms_norm_bwd.default, (make((5, 40), dtype, device), x.detach(), w.detach(), rstd, None))


def test_gradcheck_float64():
    x = make((6, 19), torch.float64, "cpu", requires_grad=True)
    r = make((6, 19), torch.float64, "cpu", requires_grad=True)
    w = make((19,), torch.float64, "cpu", requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: lo.rms_norm(a, b), (x, w))
    assert torch.autograd.gradcheck(lambda a, c, b: lo.add_rms_norm(a, c, b), (x, r, w))


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(0, 40), n=st.integers(1, 300), dt=st.sampled_from(DTYPES))
def test_hypothesis_shapes(rows, n, dt):
    x, w = make((rows, n), dt, "cpu"), make((n,), dt, "cpu")
    assert_close(lo.rms_norm(x, w), lo.rms_norm_reference(x.float(), w.float()), _torch_lowp_rms_norm(x, w, 1e-6))


def test_torch_compile_fullgraph():
    def f(x, r, w):
        y, h = lo.add_rms_norm(x, r, w)
        return lo.rms_norm(y * 2, w) + h

    x, r, w = (make(s, torch.float32, "cpu", requires_grad=True) for s in ((4, 32), (4, 32), (32,)))
    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    out = compiled(x, r, w)
    ref = f(x, r, w)
    assert_close(out, ref.detach())
    g = torch.autograd.grad(out.sum(), (x, r, w))
    gr = torch.autograd.grad(ref.sum(), (x, r, w))
    for a, b in zip(g, gr):
        assert_close(a, b)


def test_reference_backend_switch():
    x, w = make((3, 16), torch.float32, "cpu"), make((16,), torch.float32, "cpu")
    lo.set_backend("reference")
    try:
        assert lo.get_backend() == "reference"
        assert torch.equal(lo.rms_norm(x, w), lo.rms_norm_reference(x, w))
    finally:
        lo.set_backend("llmcore")


# ---------------------------------------------------------------- the oracle itself
@pytest.mark.parametrize("shape", [(7, 33), (3, 5, 1025), (1, 1)])
@pytest.mark.parametrize("eps", [1e-6, 1e-2])
def test_reference_matches_independent_fp64(shape, eps):
    """rms_norm_reference / add_rms_norm_reference (the kernels' oracle) against PyTorch's own
    F.rms_norm in float64, forward and gradients, so kernel and oracle cannot share a bug."""
    x, r = make(shape, torch.float64, "cpu", seed=1, requires_grad=True), make(shape, torch.float64, "cpu", seed=2)
    w = make(shape[-1:], torch.float64, "cpu", seed=3, requires_grad=True)
    dy = make(shape, torch.float64, "cpu", seed=4)
    y = lo.rms_norm_reference(x, w, eps)
    yi = F.rms_norm(x, (shape[-1],), w, eps)
    assert_close(y, yi, name="rms_norm_reference vs F.rms_norm")
    for g, gi, nm in zip(torch.autograd.grad(y, (x, w), dy), torch.autograd.grad(yi, (x, w), dy), ("dx", "dw")):
        assert_close(g, gi, name=nm)
    ya, h = lo.add_rms_norm_reference(x, r, w, eps)
    assert torch.equal(h, x + r)
    assert_close(ya, F.rms_norm(x + r, (shape[-1],), w, eps), name="add_rms_norm_reference")
