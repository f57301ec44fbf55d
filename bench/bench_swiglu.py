"""swiglu benchmarks: llmcore (separate and packed) vs reference vs torch.compile(reference) vs Liger.

Shapes (tokens, F): 16384 tokens x minimind's ffn 1408 and Llama-7B's 11008, and a decode step
(1 token). On CPU: 4096 x 1408 and the decode shape (a bench run stays short on the shared 2-core
machine). Bytes counted (the floor): fwd reads gate, up and writes y (3 M F); bwd reads dy, gate,
up and writes dgate, dup (5 M F); fwd+bwd is the sum.
"""
import pytest
import torch

import llmcore.ops as lo
from bench.conftest import measure

GPU_SHAPES = [(16384, 1408), (16384, 11008), (1, 1408)]
CPU_SHAPES = [(4096, 1408), (1, 1408)]
DTYPES = [torch.bfloat16, torch.float32]


def _providers():
    ps = {
        "llmcore": lo.swiglu,
        "llmcore-packed": None,  # swiglu_packed on a (M, 2F) tensor, see below
        "reference": lo.swiglu_reference,
        "torch.compile": torch.compile(lo.swiglu_reference, dynamic=False),
    }
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        ps["liger"] = LigerSiLUMulFunction.apply
    except Exception:  # liger needs triton + CUDA
        pass
    return ps


PROVIDERS = _providers()


@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", sorted(set(GPU_SHAPES + CPU_SHAPES)))
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_swiglu(benchmark, device, provider, shape, dtype, mode):
    if (device == "cpu") != (shape in CPU_SHAPES):
        pytest.skip("shape is for the other device")
    if provider == "liger" and device != "cuda":
        pytest.skip("liger runs on CUDA only")
    M, N = shape
    grad = mode != "fwd"
    if provider == "llmcore-packed":
        gu = torch.randn(M, 2 * N, device=device, dtype=dtype, requires_grad=grad)
        inputs = (gu,)

        def fn(x):
            return lo.swiglu_packed(x)
    else:
        inputs = (torch.randn(M, N, device=device, dtype=dtype, requires_grad=grad),
                  torch.randn(M, N, device=device, dtype=dtype, requires_grad=grad))
        fn = PROVIDERS[provider]
    dy = torch.randn(M, N, device=device, dtype=dtype)
    es = dy.element_size()
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(*inputs)
        nbytes = 3 * M * N * es
    elif mode == "bwd":
        y = fn(*inputs)

        def run():
            torch.autograd.grad(y, inputs, dy, retain_graph=True)
        nbytes = 5 * M * N * es
    else:
        def run():
            torch.autograd.grad(fn(*inputs), inputs, dy)
        nbytes = 8 * M * N * es
    measure(benchmark, run, op="swiglu", provider=provider, mode=mode, shape=shape, dtype=dtype, device=device,
            nbytes=nbytes, rounds=None if device == "cuda" else 20)  # 20: the CPU box is shared and noisy
