"""rms_norm benchmarks: llmcore vs reference vs torch.compile(reference) vs F.rms_norm vs Liger.

Bytes counted (the floor): fwd reads x and w, writes y (+ rstd); bwd reads dy, x, w, rstd and
writes dx, dw; fwd+bwd is the sum.
"""
import pytest
import torch

import llmcore.ops as lo
from bench.conftest import measure

SHAPES = [(4096, 4096), (16384, 512), (16384, 4096)]
DTYPES = [torch.float32, torch.bfloat16]


def _providers():
    ps = {
        "llmcore": lo.rms_norm,
        "reference": lo.rms_norm_reference,
        "torch.compile": torch.compile(lo.rms_norm_reference, dynamic=False),
        "F.rms_norm": lambda x, w, eps=1e-6: torch.nn.functional.rms_norm(x, (x.shape[-1],), w, eps),
    }
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        ps["liger"] = lambda x, w, eps=1e-6: LigerRMSNormFunction.apply(x, w, eps, 0.0, "llama", False)
    except Exception:  # liger needs triton + CUDA
        pass
    return ps


PROVIDERS = _providers()


@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_rms_norm(benchmark, device, provider, shape, dtype, mode):
    if device == "cpu" and shape[0] * shape[1] > 4096 * 4096:
        pytest.skip("large shapes are for the GPU")
    if provider == "liger" and device != "cuda":
        pytest.skip("liger runs on CUDA only")
    fn = PROVIDERS[provider]
    M, N = shape
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=mode != "fwd")
    w = torch.randn(N, device=device, dtype=dtype, requires_grad=mode != "fwd")
    dy = torch.randn(shape, device=device, dtype=dtype)
    es = x.element_size()
    fwd_bytes = 2 * M * N * es + N * es + 4 * M
    bwd_bytes = 3 * M * N * es + 2 * N * es + 4 * M
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(x, w)
        nbytes = fwd_bytes
    elif mode == "bwd":
        y = fn(x, w)

        def run():
            torch.autograd.grad(y, (x, w), dy, retain_graph=True)
        nbytes = bwd_bytes
    else:
        def run():
            torch.autograd.grad(fn(x, w), (x, w), dy)
        nbytes = fwd_bytes + bwd_bytes
    measure(benchmark, run, op="rms_norm", provider=provider, mode=mode, shape=shape, dtype=dtype,
            device=device, nbytes=nbytes)
