"""qk_norm_rope benchmark, paired: the fused op vs the unfused llmcore ops (rms_norm on q and k, then
rope) vs torch eager (`qk_norm_rope_reference`) vs torch.compile of that reference, alternating the
providers call by call in one process (this VM's timings of memory-bound ops drift between processes;
pairing separates that from the kernels). Steady-state malloc as in bench/elementwise_cpu_paired.py.

Shape: 4096 tokens, q 16 heads, k 16 heads (--hk to change), head_dim 128, half-split layout,
positions 0..S-1, q/k weights in q's dtype. Modes: fwd (no grad) and fwd+bwd (grads of q, k and both
weights). Bytes counted (the floor): fwd reads q, k and writes q_out, k_out (2 passes); fwd+bwd adds
the backward's read of q, k, dq_out, dk_out and write of dq, dk (5 passes in all).

    PYTHONPATH=$PWD python bench/bench_qk_norm_rope.py [--rounds 31] [--dtypes bf16,fp32] [--device cpu]
"""
import argparse
import ctypes
import statistics
import time

import torch

import llmcore.ops as lo

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def providers():
    comp = torch.compile(lo.qk_norm_rope_reference, dynamic=False)

    def unfused(q, k, qw, kw, cos, sin, eps):
        return lo.rope(lo.rms_norm(q, qw, eps), lo.rms_norm(k, kw, eps), cos, sin)

    return {
        "fused": lambda q, k, qw, kw, c, s, e: lo.qk_norm_rope(q, k, qw, kw, c, s, e),
        "unfused llmcore": unfused,
        "torch eager": lambda q, k, qw, kw, c, s, e: lo.qk_norm_rope_reference(q, k, qw, kw, c, s, e),
        "torch.compile": lambda q, k, qw, kw, c, s, e: comp(q, k, qw, kw, c, s, e),
    }


def run_case(device, dtype, S, Hq, Hk, D, rounds):
    cos, sin = lo.rope_cache(S, D, device=device)
    q = torch.randn(1, S, Hq, D, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(1, S, Hk, D, device=device, dtype=dtype, requires_grad=True)
    qw = (1 + 0.1 * torch.randn(D, device=device)).to(dtype).requires_grad_()
    kw = (1 + 0.1 * torch.randn(D, device=device)).to(dtype).requires_grad_()
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    ps = providers()
    calls = {}
    for name, fn in ps.items():
        def fwd(fn=fn):
            with torch.no_grad():
                fn(q, k, qw, kw, cos, sin, 1e-6)

        def fwdbwd(fn=fn):
            torch.autograd.grad(fn(q, k, qw, kw, cos, sin, 1e-6), (q, k, qw, kw), (dq, dk))

        calls[name] = {"fwd": fwd, "fwd+bwd": fwdbwd}
    one_pass = S * (Hq + Hk) * D * q.element_size()
    rows = []
    for mode, passes in (("fwd", 2), ("fwd+bwd", 5)):
        for c in calls.values():  # warm-up (compiles)
            for _ in range(3):
                c[mode]()
        times = {n: [] for n in calls}
        names = list(calls)
        for r in range(rounds):
            order = names[r % len(names):] + names[: r % len(names)]  # rotate who goes first
            for n in order:
                _sync(device)
                t0 = time.perf_counter()
                calls[n][mode]()
                _sync(device)
                times[n].append(time.perf_counter() - t0)
        med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
        rows.append((mode, med, passes * one_pass))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=31)
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hq", type=int, default=16)
    ap.add_argument("--hk", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    a = ap.parse_args()
    if a.device == "cpu":
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: no fresh mmap (page faults) per call
        libc.mallopt(-1, (1 << 31) - 1)  # M_TRIM_THRESHOLD
    print(f"qk_norm_rope (1, {a.tokens}, {a.hq}, {a.hk}, {a.head_dim}) on {a.device}, threads "
          f"{torch.get_num_threads()}, {a.rounds} paired rounds, median ms (GB/s)")
    print("| dtype | mode | fused | unfused llmcore | torch eager | torch.compile | fused vs unfused / eager / compile |")
    print("|---|---|---|---|---|---|---|")
    for dn in a.dtypes.split(","):
        for mode, med, nbytes in run_case(a.device, DTYPES[dn], a.tokens, a.hq, a.hk, a.head_dim, a.rounds):
            cell = {n: f"{m:.3f} ({nbytes / m / 1e6:.1f})" for n, m in med.items()}
            f = med["fused"]
            print(f"| {dn} | {mode} | {cell['fused']} | {cell['unfused llmcore']} | {cell['torch eager']} | "
                  f"{cell['torch.compile']} | {med['unfused llmcore'] / f:.2f}x / {med['torch eager'] / f:.2f}x / "
                  f"{med['torch.compile'] / f:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
