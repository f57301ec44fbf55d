"""rope benchmarks: llmcore vs reference vs torch.compile(reference) vs Liger (CUDA, rotate-half).

Shapes (B, S, Hq, Hkv, D) from the model presets: 16384 tokens with minimind-26m heads (8 q / 2 kv,
D 64), 16 q / 4 or 8 kv heads at D 128, and a decode step (1 token). On CPU only the 4096-token and
decode shapes run (a bench run stays short on the shared 2-core machine).
Bytes counted (the floor): fwd reads q, k and the S distinct cos/sin rows, writes q_out, k_out;
bwd the same with the gradients; fwd+bwd is the sum.
"""
import pytest
import torch

import llmcore.ops as lo
from bench.conftest import measure

GPU_SHAPES = [(4, 4096, 8, 2, 64), (4, 4096, 16, 4, 128), (4, 4096, 16, 8, 128), (1, 1, 16, 4, 128)]
CPU_SHAPES = [(1, 4096, 8, 2, 64), (1, 1, 8, 2, 64)]
DTYPES = [torch.bfloat16, torch.float32]


def _providers():
    ps = {
        "llmcore": lo.rope,
        "reference": lo.rope_reference,
        "torch.compile": torch.compile(lo.rope_reference, dynamic=False),
    }
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb

        def liger(q, k, cos, sin):  # Liger wants (B, H, S, D) views and full-width (1, S, D) tables
            S = q.shape[1]
            c, s = torch.cat([cos[:S], cos[:S]], -1)[None].to(q.dtype), torch.cat([sin[:S], sin[:S]], -1)[None].to(q.dtype)
            qo, ko = liger_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), c, s)
            return qo.transpose(1, 2), ko.transpose(1, 2)

        ps["liger"] = liger
    except Exception:  # liger needs triton + CUDA
        pass
    return ps


PROVIDERS = _providers()


@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", sorted(set(GPU_SHAPES + CPU_SHAPES)))
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_rope(benchmark, device, provider, shape, dtype, mode):
    if (device == "cpu") != (shape in CPU_SHAPES):
        pytest.skip("shape is for the other device")
    if provider == "liger" and device != "cuda":
        pytest.skip("liger runs on CUDA only")
    fn = PROVIDERS[provider]
    B, S, Hq, Hk, D = shape
    cos, sin = lo.rope_cache(max(S, 4096), D, device=device)
    q = torch.randn(B, S, Hq, D, device=device, dtype=dtype, requires_grad=mode != "fwd")
    k = torch.randn(B, S, Hk, D, device=device, dtype=dtype, requires_grad=mode != "fwd")
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    es = q.element_size()
    one_pass = 2 * B * S * (Hq + Hk) * D * es + S * D * 4
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(q, k, cos, sin)
        nbytes = one_pass
    elif mode == "bwd":
        qo, ko = fn(q, k, cos, sin)

        def run():
            torch.autograd.grad((qo, ko), (q, k), (dq, dk), retain_graph=True)
        nbytes = one_pass
    else:
        def run():
            torch.autograd.grad(fn(q, k, cos, sin), (q, k), (dq, dk))
        nbytes = 2 * one_pass
    measure(benchmark, run, op="rope", provider=provider, mode=mode, shape=shape, dtype=dtype, device=device,
            nbytes=nbytes, rounds=None if device == "cuda" else 20)  # 20: the CPU box is shared and noisy
