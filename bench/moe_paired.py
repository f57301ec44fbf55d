"""Paired MoE timings for bench/RESULTS.md on a loaded, shared machine: the providers run
interleaved and each keeps its minimum over N runs (the least-disturbed run), so their ratios
survive background load better than medians of separate runs.

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/moe_paired.py [--device cuda]
"""
import argparse
import time

import torch

import llmcore.ops as lo
from llmcore.nn import MoEFeedForward
from llmcore.nn.moe import moe_feed_forward_loop, moe_feed_forward_scatter


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _paired_min(provs, reps, device):
    best = {n: float("inf") for n in provs}
    for f in provs.values():
        f(), f()
    for _ in range(reps):
        for n, f in provs.items():
            _sync(device)
            t = time.perf_counter()
            f()
            _sync(device)
            best[n] = min(best[n], time.perf_counter() - t)
    return best


def run_layer(T, H, Fh, E, k, S, device, dtype, reps=7):
    torch.manual_seed(0)
    m = MoEFeedForward(H, Fh, E, k, num_shared_experts=S, balance="none").to(device=device, dtype=dtype)
    x = torch.randn(T, H, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(T, H, device=device, dtype=dtype)
    params = [x, *m.parameters()]
    fns = {"llmcore": m, "naive-loop": lambda v: moe_feed_forward_loop(m, v),
           "torch-scatter": lambda v: moe_feed_forward_scatter(m, v)}
    provs = {n: (lambda f=f: torch.autograd.grad(f(x), params, dy, allow_unused=True)) for n, f in fns.items()}
    best = _paired_min(provs, reps, device)
    print("layer fwd+bwd", (T, H, Fh, E, k, S), " ".join(f"{n} {v * 1e3:.2f}ms" for n, v in best.items()),
          f"| naive/llmcore {best['naive-loop'] / best['llmcore']:.2f}x"
          f" scatter/llmcore {best['torch-scatter'] / best['llmcore']:.2f}x")


@torch.no_grad()
def run_ops(T, E, k, H, device, dtype, reps=15):
    x = torch.randn(T, H, device=device).to(dtype)
    ids = torch.topk(torch.randn(T, E, device=device), k).indices.int()
    w = torch.rand(T, k, device=device)
    xp, _, _, rm = lo.moe_dispatch(x, ids, E)
    fd = torch.compile(lo.moe_dispatch_reference, dynamic=False)
    fc = torch.compile(lo.moe_combine_reference, dynamic=False)
    provs = {"dispatch llmcore": lambda: lo.moe_dispatch(x, ids, E), "dispatch compile": lambda: fd(x, ids, E),
             "combine llmcore": lambda: lo.moe_combine(xp, w, rm, T), "combine compile": lambda: fc(xp, w, rm, T),
             "copy(x_perm)": lambda: xp.clone()}
    best = _paired_min(provs, reps, device)
    es = x.element_size()
    disp, comb = (T * H + T * k * H) * es + 8 * T * k, (T * k * H + T * H) * es + 8 * T * k
    print((T, E, k, H), str(dtype)[6:], " ".join(f"{n} {v * 1e3:.2f}ms" for n, v in best.items()),
          f"| dispatch {disp / best['dispatch llmcore'] / 1e9:.1f} GB/s, combine"
          f" {comb / best['combine llmcore'] / 1e9:.1f} GB/s, copy {2 * T * k * H * es / best['copy(x_perm)'] / 1e9:.1f} GB/s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    gpu = a.device == "cuda"
    layer_dtype = torch.bfloat16 if gpu else torch.float32
    T = 4096 if gpu else 512
    for shp in [(128, 640, 1728, 4, 2, 1), (T, 640, 1728, 4, 2, 1), (T, 768, 2048, 8, 1, 1),
                (T, 768, 2048, 8, 2, 1)] + ([(T, 2048, 1408, 64, 6, 2), (T, 2048, 1408, 64, 8, 0)] if gpu else []):
        run_layer(*shp, a.device, layer_dtype)
    for dt in (torch.float32, torch.bfloat16):
        for shp in [(4096, 8, 2, 640), (16384, 4, 2, 768), (4096 if gpu else 1024, 64, 8, 2048)]:
            run_ops(*shp, a.device, dt)


if __name__ == "__main__":
    main()
