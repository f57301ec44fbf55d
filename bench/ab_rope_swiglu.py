"""Interleaved A/B timing of rope / swiglu on CPU: llmcore vs reference vs torch.compile(reference).

For a shared, oversubscribed machine, where pytest-benchmark's back-to-back rounds of one provider
see a different load than the next provider's: here every round times each provider once, in turn,
so all of them see the same load; min and median over the rounds are printed.

    PYTHONPATH=. python bench/ab_rope_swiglu.py rope|swiglu
"""
import statistics
import sys
import time

import torch

import llmcore.ops as lo


def interleaved(providers, rounds=40):
    times = {name: [] for name in providers}
    for fn in providers.values():
        for _ in range(3):
            fn()
    for _ in range(rounds):
        for name, fn in providers.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (min(v) * 1e3, statistics.median(v) * 1e3) for name, v in times.items()}


def providers_for(op, dtype):
    ps = {}
    if op == "swiglu":
        g = torch.randn(4096, 1408, dtype=dtype, requires_grad=True)
        u = torch.randn_like(g, requires_grad=True)
        dy = torch.randn_like(g)
        for name, fn in (("llmcore", lo.swiglu), ("reference", lo.swiglu_reference),
                         ("torch.compile", torch.compile(lo.swiglu_reference, dynamic=False))):
            ps[name + " fwd"] = lambda fn=fn: fn(g.detach(), u.detach())
            ps[name + " fwd+bwd"] = lambda fn=fn: torch.autograd.grad(fn(g, u), (g, u), dy)
    else:
        cos, sin = lo.rope_cache(4096, 64)
        q = torch.randn(1, 4096, 8, 64, dtype=dtype, requires_grad=True)
        k = torch.randn(1, 4096, 2, 64, dtype=dtype, requires_grad=True)
        dq, dk = torch.randn_like(q), torch.randn_like(k)
        for name, fn in (("llmcore", lo.rope), ("reference", lo.rope_reference),
                         ("torch.compile", torch.compile(lo.rope_reference, dynamic=False))):
            ps[name + " fwd"] = lambda fn=fn: fn(q.detach(), k.detach(), cos, sin)
            ps[name + " fwd+bwd"] = lambda fn=fn: torch.autograd.grad(fn(q, k, cos, sin), (q, k), (dq, dk))
    return ps


if __name__ == "__main__":
    op = sys.argv[1] if len(sys.argv) > 1 else "rope"
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        for name, (mn, md) in interleaved(providers_for(op, dtype)).items():
            print(f"{op} {str(dtype)[6:]:9s} {name:22s} min {mn:9.3f} ms  median {md:9.3f} ms")
