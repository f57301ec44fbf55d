"""Paired CPU timing of llmcore.ops.flash_attn against SDPA's CPU flash backend, bf16, S = 1024.

On a shared machine separate pytest-benchmark runs drift apart; here each mode alternates the two
providers call by call in one process and reports medians, so both see the same load.

    PYTHONPATH=$PWD python bench/flash_attn_cpu_paired.py [rounds] [--dtype float32]
    LLMCORE_CPU_BF16_PATH=0 ...   # the fp32 tile path instead of the AVX512-BF16 one
"""
import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import llmcore
import llmcore.ops as lo


def sdpa(q, k, v, causal):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=causal).transpose(1, 2)


def ours(q, k, v, causal):
    return lo.flash_attn(q, k, v, causal=causal)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("rounds", type=int, nargs="?", default=11)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"{args.dtype}, {args.threads} threads, avx512bf16 path: {llmcore.build_info().get('cpu_avx512bf16_path')}, "
          f"medians of {args.rounds}, ms")
    for B, S, H, D in [(2, 1024, 8, 64), (2, 1024, 4, 128)]:
        for causal in (True, False):
            q, k, v = (torch.randn(B, S, H, D, dtype=dtype, requires_grad=True) for _ in range(3))
            dout = torch.randn(B, S, H, D, dtype=dtype)
            runs = {}
            for name, f in (("llmcore", ours), ("sdpa", sdpa)):
                out = f(q, k, v, causal)

                def fwd(f=f):
                    with torch.no_grad():
                        f(q, k, v, causal)

                def bwd(out=out):
                    torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)

                def fwd_bwd(f=f):
                    torch.autograd.grad(f(q, k, v, causal), (q, k, v), dout)
                runs[name] = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}
            cells = []
            for mode in ("fwd", "bwd", "fwd+bwd"):
                times = {n: [] for n in runs}
                for n in runs:
                    runs[n][mode]()  # warm-up
                for _ in range(args.rounds):
                    for n in runs:
                        t0 = time.perf_counter()
                        runs[n][mode]()
                        times[n].append((time.perf_counter() - t0) * 1e3)
                med = {n: sorted(t)[len(t) // 2] for n, t in times.items()}
                cells.append(f"{mode} {med['llmcore']:.1f} vs {med['sdpa']:.1f} ({med['sdpa'] / med['llmcore']:.2f}x)")
            print(f"({B}, {S}, {H}, {D}) {'causal' if causal else 'full  '}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
