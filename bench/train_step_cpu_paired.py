"""Paired CPU timing of one training step (forward + backward + AdamW) of preset `tiny`, bf16
autocast, batch 8 x 256, dense causal: llmcore vs the same model in plain PyTorch (eager) vs
torch.compile of it. The three providers alternate step by step in one process and the medians are
reported, so all see the same machine load (bench/bench_train_step.py is the pytest-benchmark form).

    PYTHONPATH=$PWD python bench/train_step_cpu_paired.py [rounds] [--threads 2]
    LLMCORE_CPU_GEMM=avx512bf16 ...   # force a tile-GEMM engine (csrc/common/cpu_gemm.h)
"""
import argparse
import time

import torch

import llmcore
from bench.bench_train_step import make_step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("rounds", type=int, nargs="?", default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    info = llmcore.build_info()
    print(f"{info['cpu_model']}, {args.threads} threads, flash-attn engine {info['cpu_gemm_bf16']}; "
          f"{args.preset} {args.batch}x{args.seq}, medians of {args.rounds} steps, ms")
    steps = {p: make_step(args.preset, args.batch, args.seq, "cpu", p)[1] for p in ("llmcore", "torch", "torch.compile")}
    for f in steps.values():  # warm-up (compile, oneDNN kernel JIT, allocator)
        f(), f()
    times = {p: [] for p in steps}
    for _ in range(args.rounds):
        for p, f in steps.items():
            t = time.perf_counter()
            f()
            times[p].append(time.perf_counter() - t)
    med = {p: sorted(t)[len(t) // 2] * 1e3 for p, t in times.items()}
    tokens = args.batch * args.seq
    for p, m in med.items():
        print(f"  {p:14s} {m:8.1f} ms  {tokens / m * 1e3:8.0f} tokens/s")
    print(f"  llmcore speed-up: {med['torch'] / med['llmcore']:.2f}x eager, "
          f"{med['torch.compile'] / med['llmcore']:.2f}x torch.compile")


if __name__ == "__main__":
    main()
