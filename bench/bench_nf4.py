"""nf4 benchmarks: dequantize GB/s and NF4Linear forward, llmcore vs reference vs
torch.compile(reference) vs bitsandbytes (when installed).

Bytes counted for dequantize (the floor): packed codes n/2 + uint8 scales n/64 + fp32 second-level
scales + the 1 KiB code2 read, plus n * sizeof(out) written (double quant, blocksize 64).
NF4Linear: FLOPs 2 * tokens * in * out, bf16 compute; dense nn.Linear in bf16 is the ceiling.
On CPU the 8192x28672 weight is skipped and the training shape uses 512 tokens instead of 4096
(2 shared cores); on CUDA all shapes run as specified.
"""
import pytest
import torch

import llmcore.ops as lo
from bench.conftest import measure
from llmcore.nn import NF4Linear

try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF
except Exception:  # bitsandbytes is optional
    bnb = bnbF = None

DEQUANT_SHAPES = [(4096, 4096), (4096, 11008), (8192, 28672)]
DTYPES = [torch.bfloat16, torch.float32]


def _dequant_bytes(n, out_dtype):
    nblocks = n // 64
    return n // 2 + nblocks + 4 * ((nblocks + 255) // 256) + 1024 + n * torch.finfo(out_dtype).bits // 8


_compiled_ref = torch.compile(lambda nf, dt: lo.nf4_dequantize_reference(nf, dt), dynamic=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", DEQUANT_SHAPES)
@pytest.mark.parametrize("provider", ["llmcore", "reference", "torch.compile", "bitsandbytes"])
def test_nf4_dequantize(benchmark, device, provider, shape, dtype):
    if device == "cpu" and shape[0] * shape[1] > 4096 * 11008:
        pytest.skip("the largest weight is for the GPU")
    if device == "cpu" and provider in ("reference", "torch.compile") and shape != (4096, 4096):
        pytest.skip("the torch reference runs at one shape on CPU (slow)")
    if provider == "bitsandbytes" and bnbF is None:
        pytest.skip("bitsandbytes is not installed")
    w = torch.randn(shape, device=device, dtype=dtype)
    if provider == "bitsandbytes":
        packed, qs = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        fn = lambda: bnbF.dequantize_4bit(packed, qs)  # noqa: E731
    else:
        nf = lo.nf4_quantize(w, 64, double_quant=True)
        impl = {"llmcore": lo.nf4_dequantize, "reference": lo.nf4_dequantize_reference,
                "torch.compile": _compiled_ref}[provider]
        fn = lambda: impl(nf, dtype)  # noqa: E731
    measure(benchmark, fn, op="nf4_dequant", provider=provider, mode="fwd", shape=shape, dtype=dtype,
            device=device, nbytes=_dequant_bytes(w.numel(), dtype), rounds=10 if device == "cpu" else None)


@pytest.mark.parametrize("provider", ["llmcore", "bitsandbytes"])
def test_nf4_quantize(benchmark, device, provider):
    shape = (4096, 4096)
    if provider == "bitsandbytes" and bnbF is None:
        pytest.skip("bitsandbytes is not installed")
    w = torch.randn(shape, device=device, dtype=torch.bfloat16)
    if provider == "llmcore":
        fn = lambda: lo.nf4_quantize(w, 64, True)  # noqa: E731
    else:
        fn = lambda: bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")  # noqa: E731
    measure(benchmark, fn, op="nf4_quantize", provider=provider, mode="fwd", shape=shape, dtype=torch.bfloat16,
            device=device, nbytes=w.numel() * 2 + w.numel() // 2 + w.numel() // 64, rounds=3 if device == "cpu" else None)


@pytest.mark.parametrize("mode", ["decode", "train"])
@pytest.mark.parametrize("provider", ["llmcore", "reference", "bitsandbytes", "dense bf16"])
def test_nf4_linear(benchmark, device, provider, mode):
    in_f = out_f = 4096
    tokens = 1 if mode == "decode" else (4096 if device == "cuda" else 512)
    dtype = torch.bfloat16
    lin = torch.nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype)
    x = torch.randn(tokens, in_f, device=device, dtype=dtype)
    if provider == "llmcore":
        layer = NF4Linear.from_linear(lin)
    elif provider == "reference":
        nf = lo.nf4_quantize(lin.weight.detach())
        layer = lambda t: torch.nn.functional.linear(t, lo.nf4_dequantize_reference(nf, dtype))  # noqa: E731
    elif provider == "bitsandbytes":
        if bnb is None:
            pytest.skip("bitsandbytes is not installed")
        layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=dtype, quant_type="nf4",
                                  compress_statistics=True)
        layer.load_state_dict(lin.state_dict())
        layer = layer.to(device)
    else:
        layer = lin

    def run():
        with torch.no_grad():
            layer(x)

    measure(benchmark, run, op="nf4_linear", provider=provider, mode=mode, shape=(tokens, in_f, out_f), dtype=dtype,
            device=device, flops=2 * tokens * in_f * out_f, rounds=5 if device == "cpu" else None)
