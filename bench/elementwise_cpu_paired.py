"""Paired CPU timing of the elementwise ops (swiglu, rms_norm, rope) against torch.compile of their
references, fwd+bwd, at the bench shapes.

This VM's timings of memory-bound ops drift between processes by up to 2x (where the pages of a run
land); alternating the two providers call by call in one process, each case in fresh processes of its
own, separates that from the kernels. Steady-state malloc as in bench/conftest.py.

    PYTHONPATH=$PWD python bench/elementwise_cpu_paired.py [--rounds 21] [--procs 3]
"""
import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time


def one_process(rounds, only):
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 1 << 30)
    libc.mallopt(-1, (1 << 31) - 1)
    import torch

    import llmcore.ops as lo

    cases = []
    for dt in (torch.bfloat16, torch.float32):
        g = torch.randn(4096, 1408, dtype=dt, requires_grad=True)
        u = torch.randn(4096, 1408, dtype=dt, requires_grad=True)
        dy = torch.randn(4096, 1408, dtype=dt)
        comp = torch.compile(lo.swiglu_reference, dynamic=False)
        cases.append((f"swiglu 4096x1408 {dt}",
                      lambda g=g, u=u, dy=dy: torch.autograd.grad(lo.swiglu(g, u), (g, u), dy),
                      lambda g=g, u=u, dy=dy, f=comp: torch.autograd.grad(f(g, u), (g, u), dy)))
        for M, N in ((4096, 4096), (16384, 512)):
            x = torch.randn(M, N, dtype=dt, requires_grad=True)
            w = torch.randn(N, dtype=dt, requires_grad=True)
            dx = torch.randn(M, N, dtype=dt)
            comp = torch.compile(lo.rms_norm_reference, dynamic=False)
            cases.append((f"rms_norm {M}x{N} {dt}",
                          lambda x=x, w=w, dx=dx: torch.autograd.grad(lo.rms_norm(x, w), (x, w), dx),
                          lambda x=x, w=w, dx=dx, f=comp: torch.autograd.grad(f(x, w), (x, w), dx)))
        q = torch.randn(1, 4096, 8, 64, dtype=dt, requires_grad=True)
        k = torch.randn(1, 4096, 2, 64, dtype=dt, requires_grad=True)
        cos, sin = lo.rope_cache(4096, 64)
        dq, dk = torch.randn_like(q), torch.randn_like(k)
        comp = torch.compile(lo.rope_reference, dynamic=False)
        cases.append((f"rope (1,4096,8,2,64) {dt}",
                      lambda q=q, k=k, dq=dq, dk=dk: torch.autograd.grad(lo.rope(q, k, cos, sin), (q, k), (dq, dk)),
                      lambda q=q, k=k, dq=dq, dk=dk, f=comp: torch.autograd.grad(f(q, k, cos, sin), (q, k),
                                                                                 (dq, dk))))
    out = {}
    for name, a, b in cases:
        if name != only:
            continue
        for _ in range(3):
            a(), b()
        ta, tb = [], []
        for _ in range(rounds):
            t0 = time.perf_counter(); a(); t1 = time.perf_counter(); b(); t2 = time.perf_counter()
            ta.append(t1 - t0), tb.append(t2 - t1)
        out[name] = (statistics.median(ta) * 1e3, statistics.median(tb) * 1e3)
    print("@@" + json.dumps(out))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--procs", type=int, default=3)
    ap.add_argument("--child", default=None, help="(internal) time this case in this process")
    a = ap.parse_args()
    if a.child:
        return one_process(a.rounds, a.child)
    names = [f"{op} {dt}" for dt in ("torch.bfloat16", "torch.float32")
             for op in ("swiglu 4096x1408", "rms_norm 4096x4096", "rms_norm 16384x512", "rope (1,4096,8,2,64)")]
    runs = [{} for _ in range(a.procs)]
    for name in names:  # one fresh process per (case, repeat): no case shares a process with another
        for r in runs:
            res = subprocess.run([sys.executable, __file__, "--child", name, "--rounds", str(a.rounds)],
                                 capture_output=True, text=True, env=os.environ, check=True)
            r.update(json.loads(next(l for l in res.stdout.splitlines() if l.startswith("@@"))[2:]))
    print(f"fwd+bwd ms, llmcore vs torch.compile(reference), alternating in one process; {a.procs} processes")
    print("| case | llmcore ms (per process) | torch.compile ms | speed-up (per process) |")
    print("|---|---|---|---|")
    for name in names:
        ours = [r[name][0] for r in runs]
        comp = [r[name][1] for r in runs]
        print(f"| {name.replace('torch.', '')} | {' / '.join(f'{v:.2f}' for v in ours)} | "
              f"{' / '.join(f'{v:.2f}' for v in comp)} | {' / '.join(f'{c / o:.2f}x' for o, c in zip(ours, comp))} |")


if __name__ == "__main__":
    main()
