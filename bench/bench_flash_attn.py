"""flash_attn benchmarks: llmcore vs PyTorch SDPA (each backend available: flash, cuDNN, efficient,
math), the fp32 reference and torch.compile(reference); fwd, bwd and fwd+bwd; plus KV-cache decode.

FLOPs counted: fwd 4 * B * H * Sq * Sk * D (halved when causal), bwd 2.5x that, fwd+bwd 3.5x;
printed beside the measured bf16 matmul rate. Decode: GB/s over the K/V cache bytes read
(2 * B * cache_len * Hkv * D * elem), beside the measured copy bandwidth.
Shapes: B * S = 16k tokens on GPU (S 512 .. 16k, D 64 / 128, hidden 2048); CPU runs a few small
shapes (S = 512 / 1024, 2k tokens) to stay short.
"""
import pytest
import torch
import torch.nn.functional as F

import llmcore.ops as lo
from bench.conftest import measure

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover
    SDPBackend = sdpa_kernel = None


def _sdpa(backend):
    def f(q, k, v, causal=True):
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if backend is None:
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=True).transpose(1, 2)
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal,
                                                  enable_gqa=k.shape[2] != q.shape[2]).transpose(1, 2)
    return f


def _providers(device):
    ps = {"llmcore": lambda q, k, v, causal=True: lo.flash_attn(q, k, v, causal=causal),
          "reference": lambda q, k, v, causal=True: lo.flash_attn_reference(q, k, v, causal=causal),
          "torch.compile": torch.compile(lambda q, k, v, causal=True: lo.flash_attn_reference(q, k, v, causal=causal),
                                         dynamic=False)}
    if SDPBackend is not None:
        backends = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-math": SDPBackend.MATH}
        if device == "cuda":
            backends.update({"sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION})
        for name, be in backends.items():
            ps[name] = _sdpa(be)
    return ps


DEV = "cuda" if torch.cuda.is_available() else "cpu"
PROVIDERS = _providers(DEV)
if DEV == "cuda":
    CASES = [(16384 // s, s, 2048 // d, d) for s in (512, 1024, 2048, 4096, 8192, 16384) for d in (64, 128)]
    DTYPE = torch.bfloat16
else:
    CASES = [(4, 512, 8, 64), (2, 1024, 8, 64), (2, 1024, 4, 128)]
    DTYPE = torch.float32


@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd+bwd"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_S{}_H{}_D{}".format(*c))
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_flash_attn(benchmark, device, provider, case, causal, mode):
    B, S, H, D = case
    if provider in ("reference", "torch.compile", "sdpa-math") and S > 4096:
        pytest.skip("materializes S x S")
    if device == "cpu" and (provider == "torch.compile" or (not causal and S != 1024)):
        pytest.skip("kept short on CPU")
    fn = PROVIDERS[provider]
    dtype = DTYPE
    q, k, v = (torch.randn(B, S, H, D, device=device, dtype=dtype, requires_grad=mode != "fwd") for _ in range(3))
    dout = torch.randn(B, S, H, D, device=device, dtype=dtype)
    try:
        fn(q, k, v, causal)
    except RuntimeError as e:  # an SDPA backend that does not take this shape / dtype / device
        pytest.skip(f"{provider}: {str(e).splitlines()[0][:80]}")
    _measure_mode(benchmark, fn, q, k, v, dout, causal, mode, provider, device, rounds=5 if device == "cpu" else None)


def _measure_mode(benchmark, fn, q, k, v, dout, causal, mode, provider, device, rounds):
    """Times fwd, bwd (from a kept graph) or fwd+bwd of fn on (q, k, v) and records the row."""
    B, S, H, D = q.shape
    fl = 4 * B * H * S * S * D * (0.5 if causal else 1.0)
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(q, k, v, causal)
        flops = fl
    elif mode == "bwd":
        out = fn(q, k, v, causal)

        def run():
            torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
        flops = 2.5 * fl
    else:
        def run():
            torch.autograd.grad(fn(q, k, v, causal), (q, k, v), dout)
        flops = 3.5 * fl
    measure(benchmark, run, op="flash_attn", provider=provider, mode=mode, shape=(B, S, H, D, "c" if causal else "f"),
            dtype=q.dtype, device=device, flops=flops, rounds=rounds)


# CPU bf16 (the AVX512-BF16 path where the CPU has it, see llmcore.build_info()["cpu_avx512bf16_path"])
# against SDPA's CPU flash backend only, S = 1024, to keep the run short.
CPU_BF16_CASES = [(2, 1024, 8, 64), (2, 1024, 4, 128)] if DEV == "cpu" else []


@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd+bwd"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", CPU_BF16_CASES, ids=lambda c: "B{}_S{}_H{}_D{}".format(*c))
@pytest.mark.parametrize("provider", ["llmcore", "sdpa-flash"])
def test_flash_attn_cpu_bf16(benchmark, device, provider, case, causal, mode):
    if device != "cpu" or provider not in PROVIDERS:
        pytest.skip("CPU bf16 cases")
    B, S, H, D = case
    fn = PROVIDERS[provider]
    q, k, v = (torch.randn(B, S, H, D, dtype=torch.bfloat16, requires_grad=mode != "fwd") for _ in range(3))
    dout = torch.randn(B, S, H, D, dtype=torch.bfloat16)
    _measure_mode(benchmark, fn, q, k, v, dout, causal, mode, provider, device, rounds=5)


DECODE = [(1, 4096, 32, 8, 128), (1, 16384, 32, 8, 128), (8, 4096, 16, 4, 128)] if DEV == "cuda" else \
    [(1, 4096, 8, 2, 64), (4, 2048, 8, 2, 128)]


@pytest.mark.parametrize("case", DECODE, ids=lambda c: "B{}_L{}_Hq{}_Hkv{}_D{}".format(*c))
@pytest.mark.parametrize("provider", ["llmcore", "sdpa"])
def test_flash_attn_decode(benchmark, device, provider, case):
    B, L, Hq, Hkv, D = case
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    kc = torch.randn(B, L + 16, Hkv, D, device=device, dtype=dtype)
    vc = torch.randn_like(kc)
    lens = torch.full((B,), L - 1, dtype=torch.int32, device=device)
    q = torch.randn(B, 1, Hq, D, device=device, dtype=dtype)
    kn, vn = torch.randn(B, 1, Hkv, D, device=device, dtype=dtype), torch.randn(B, 1, Hkv, D, device=device, dtype=dtype)
    if provider == "llmcore":
        def run():
            lo.flash_attn_with_kvcache(q, kc, vc, lens, k_new=kn, v_new=vn, causal=True)
    else:
        def run():
            kc[:, L - 1:L] = kn
            vc[:, L - 1:L] = vn
            F.scaled_dot_product_attention(q.transpose(1, 2), kc[:, :L].transpose(1, 2), vc[:, :L].transpose(1, 2),
                                           enable_gqa=True)
    nbytes = 2 * B * L * Hkv * D * kc.element_size()
    measure(benchmark, run, op="flash_attn_decode", provider=provider, mode="fwd", shape=case, dtype=dtype,
            device=device, nbytes=nbytes)
