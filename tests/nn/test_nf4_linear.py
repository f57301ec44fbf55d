"""NF4Linear against a dequantized-weight nn.functional.linear reference."""
import pytest
import torch

import llmcore.ops as lo
from llmcore.nn import NF4Linear
from tests.conftest import DEVICES, DTYPES, assert_close, make


def _layer(in_f, out_f, bias, device, dtype=torch.float32, **kw):
    lin = torch.nn.Linear(in_f, out_f, bias=bias, device=device, dtype=dtype)
    return lin, NF4Linear.from_linear(lin, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (7, 130), (2, 3, 127), (5, 1025)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_backward_vs_dequantized_reference(device, dtype, shape, bias):
    in_f, out_f = shape[-1], 33
    lin, layer = _layer(in_f, out_f, bias, device, dtype)
    x = make(shape, dtype, device, requires_grad=True)
    y = layer(x)
    dy = make(y.shape, dtype, device)
    (dx,) = torch.autograd.grad(y, (x,), dy)
    assert y.dtype == dtype and dx.dtype == dtype and y.shape == (*shape[:-1], out_f)

    w32 = lo.nf4_dequantize(layer.weight, torch.float32)
    b32 = None if lin.bias is None else lin.bias.detach().float()
    xr = x.detach().float().requires_grad_()
    yr = torch.nn.functional.linear(xr, w32, b32)
    (dxr,) = torch.autograd.grad(yr, (xr,), dy.float())
    wl = lo.nf4_dequantize(layer.weight, dtype)  # PyTorch in the low precision: the baseline
    xb = x.detach().clone().requires_grad_()
    yb = torch.nn.functional.linear(xb, wl, None if lin.bias is None else lin.bias.detach())
    (dxb,) = torch.autograd.grad(yb, (xb,), dy)
    assert_close(y, yr, yb, name="y", atol=1e-4)
    assert_close(dx, dxr, dxb, name="dx", atol=1e-4)


def test_weight_and_bias_are_frozen():
    lin, layer = _layer(64, 16, True, "cpu")
    assert not layer.bias.requires_grad and len([p for p in layer.parameters() if p.requires_grad]) == 0
    x = torch.randn(4, 64, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.bias.grad is None
    # no input grad requested: backward must not be needed / fail
    with torch.no_grad():
        layer(torch.randn(2, 64))


def test_from_linear_and_weight_dequantized():
    lin, layer = _layer(130, 70, True, "cpu", blocksize=128, double_quant=False)
    assert layer.in_features == 130 and layer.out_features == 70 and layer.blocksize == 128
    nf = lo.nf4_quantize(lin.weight.detach(), 128, double_quant=False)
    assert torch.equal(layer.weight_dequantized(), lo.nf4_dequantize(nf))
    assert layer.weight_dequantized(torch.bfloat16).dtype == torch.bfloat16
    assert torch.equal(layer.bias, lin.bias)
    w = layer.weight_dequantized()
    rel = ((w - lin.weight).norm() / lin.weight.norm()).item()
    assert rel < 0.12  # the NF4 round-trip error of a uniform init


def test_gradcheck_float64():
    _, layer = _layer(70, 9, True, "cpu", compute_dtype=torch.float64)
    x = torch.randn(3, 70, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


def test_autocast_cpu_bf16():
    lin, layer = _layer(96, 40, True, "cpu")
    x = torch.randn(5, 96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        ref = torch.nn.functional.linear(x, layer.weight_dequantized(torch.float32), lin.bias)
    assert y.dtype == torch.bfloat16 == ref.dtype
    assert torch.equal(y, ref)  # same bf16 GEMM on the same bf16-rounded weight and input
    xg = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(xg).float().sum().backward()
    assert xg.grad.dtype == torch.float32
    assert_close(xg.grad, layer.weight_dequantized(torch.float32).sum(0).expand(5, 96), atol=0.1, rtol=0.02,
                 name="dx under autocast")


def test_compute_dtype_override():
    _, layer = _layer(64, 8, False, "cpu", compute_dtype=torch.bfloat16)
    x = torch.randn(2, 64, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32


def test_state_dict_round_trip():
    _, layer = _layer(64, 32, True, "cpu")
    sd = layer.state_dict()
    assert set(sd) == {"bias", "weight_data", "weight_absmax", "weight_absmax2", "weight_code2", "weight_offset"}
    _, other = _layer(64, 32, True, "cpu")
    other.load_state_dict(sd)
    x = torch.randn(3, 64)
    assert torch.equal(other(x), layer(x))


def test_bad_input():
    _, layer = _layer(64, 8, False, "cpu")
    with pytest.raises(ValueError, match="last dim 64"):
        layer(torch.randn(2, 63))
    with pytest.raises(ValueError, match="2-D"):
        NF4Linear(lo.nf4_quantize(torch.randn(4, 4, 4)))


def test_torch_compile_fullgraph():
    _, layer = _layer(128, 16, True, "cpu")
    x = torch.randn(4, 128)
    compiled = torch.compile(layer, fullgraph=True)
    assert torch.allclose(compiled(x), layer(x), atol=1e-5, rtol=1e-5)


def test_matches_bitsandbytes_linear4bit():
    bnb = pytest.importorskip("bitsandbytes")
    lin = torch.nn.Linear(256, 64)
    ref = bnb.nn.Linear4bit(256, 64, bias=True, compute_dtype=torch.float32, quant_type="nf4",
                            compress_statistics=True)
    ref.load_state_dict(lin.state_dict())
    ref = ref.to("cpu")  # quantization happens when the layer first moves to a device
    if not getattr(ref.weight, "bnb_quantized", False):
        pytest.skip("this bitsandbytes build does not quantize Linear4bit on CPU")
    layer = NF4Linear.from_linear(lin)
    from llmcore.ops.nf4 import NF4Weight

    theirs = NF4Weight.from_bnb(ref.weight.data, ref.weight.quant_state)
    assert torch.equal(theirs.data, layer.weight.data) and torch.equal(theirs.absmax, layer.weight.absmax)
    x = torch.randn(3, 256)
    assert torch.allclose(layer(x), ref(x), atol=1e-5, rtol=1e-5)
