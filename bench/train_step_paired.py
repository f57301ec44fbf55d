"""Paired CPU timing of one training step (forward + backward + AdamW, bf16 autocast) of preset tiny:
llmcore (fused_linear_cross_entropy loss, the default), llmcore with fused_ce=False (logits +
F.cross_entropy), torch (plain PyTorch backend) and torch.compile(torch), all from the same weights,
the providers alternating step by step in one process (this VM's absolute times drift between runs).

    PYTHONPATH=$PWD python bench/train_step_paired.py [--rounds 15] [--batch 8] [--seq 256]
    LLMCORE_CPU_GEMM=avx512bf16 ...   # force a tile-GEMM engine (csrc/common/cpu_gemm.h)
"""
import argparse
import statistics
import time

import torch

from llmcore.model import Transformer, get_config
from llmcore.train.optim import build_optimizer


def make(provider, batch, seq, state=None):
    backend = "torch" if provider.startswith("torch") else "llmcore"
    cfg = get_config("tiny", backend=backend, max_seq_len=seq, fused_ce=provider != "llmcore fused_ce=False")
    torch.manual_seed(0)
    model = Transformer(cfg)
    if state is not None:
        model.load_state_dict(state)
    opt = build_optimizer(model, 1e-4)
    fwd = torch.compile(model) if provider == "torch.compile" else model
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = fwd(ids, labels=ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return model, step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    a = ap.parse_args()
    names = ["llmcore", "llmcore fused_ce=False", "torch", "torch.compile"]
    base, _ = make("llmcore", a.batch, a.seq)
    state = base.state_dict()
    steps = {n: make(n, a.batch, a.seq, state)[1] for n in names}
    first = {n: s() for n, s in steps.items()}  # warm-up / compile; the first losses agree
    for _ in range(2):
        for s in steps.values():
            s()
    times = {n: [] for n in names}
    for _ in range(a.rounds):
        for n, s in steps.items():
            t0 = time.perf_counter()
            s()
            times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) for n, v in times.items()}
    import llmcore
    info = llmcore.build_info()
    print(f"{info['cpu_model']}, flash-attn tile-GEMM engine {info['cpu_gemm_bf16']} (LLMCORE_CPU_GEMM to force one)")
    print(f"tiny, batch {a.batch} x {a.seq}, bf16 autocast, {torch.get_num_threads()} threads, {a.rounds} paired rounds")
    print("| provider | first loss | median ms/step | llmcore speedup |")
    print("| --- | ---: | ---: | ---: |")
    for n in names:
        print(f"| {n} | {first[n]:.4f} | {med[n] * 1e3:.1f} | {med[n] / med['llmcore']:.2f}x |")


if __name__ == "__main__":
    main()
