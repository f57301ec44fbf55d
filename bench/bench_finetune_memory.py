"""Peak memory and step time of full SFT vs LoRA vs QLoRA on one model (CPU or CUDA).

    python bench/bench_finetune_memory.py --preset minimind-26m --steps 3

Each mode runs in a fresh subprocess (so peaks do not mix): build the model, convert it (LoRA: r 8
on q/k/v/o + MLP; QLoRA: NF4 double-quant base, bf16 compute, then LoRA), run `--steps` AdamW steps
on random token batches under bf16 autocast. Memory method: resource.getrusage(RUSAGE_SELF).ru_maxrss
(peak resident set of the process, KiB on Linux) read after imports (the torch runtime baseline)
and at the end; the difference is what the mode itself needed at its peak. On CUDA also
torch.cuda.max_memory_allocated.
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cur_rss_mb():
    """Current resident set (MiB) from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child(mode, preset, steps, batch, seq, device):
    sys.path.insert(0, str(ROOT))
    import torch

    from llmcore.model import build_model, get_config
    from llmcore.train.lora import prepare_lora
    from llmcore.train.optim import build_optimizer

    base = rss_mb()
    torch.manual_seed(0)
    model = build_model(get_config(preset)).to(device)
    if mode != "full":
        prepare_lora(model, r=8, alpha=16, qlora=mode == "qlora")
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ready = cur_rss_mb()
    train_peak = ready
    opt = build_optimizer(model, 1e-4)
    ids = torch.randint(0, model.cfg.vocab_size, (batch, seq + 1), device=device)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            _, loss = model(ids[:, :-1], labels=ids[:, 1:])
        train_peak = max(train_peak, cur_rss_mb())
        loss.backward()
        train_peak = max(train_peak, cur_rss_mb())
        opt.step()
        train_peak = max(train_peak, cur_rss_mb())
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    out = {"mode": mode, "trainable": n_train, "rss_base_mb": base, "rss_peak_mb": rss_mb(), "rss_ready_mb": ready,
           "rss_train_peak_mb": train_peak,
           "step_s": sorted(times)[len(times) // 2]}
    if device == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="minimind-26m")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--child", default=None)
    a = p.parse_args()
    if a.child:
        return child(a.child, a.preset, a.steps, a.batch, a.seq, a.device)
    rows = []
    for mode in ("full", "lora", "qlora"):
        r = subprocess.run([sys.executable, __file__, "--child", mode, "--preset", a.preset, "--steps", str(a.steps),
                            "--batch", str(a.batch), "--seq", str(a.seq), "--device", a.device],
                           capture_output=True, text=True, check=True)
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    print("| mode | trainable params | RSS after imports | RSS model ready | RSS peak while training | "
          "training peak - imports | process peak (ru_maxrss) | step (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['mode']} | {r['trainable']:,} | {r['rss_base_mb']:.0f} | {r['rss_ready_mb']:.0f} | "
              f"{r['rss_train_peak_mb']:.0f} | {r['rss_train_peak_mb'] - r['rss_base_mb']:.0f} | {r['rss_peak_mb']:.0f} | "
              f"{r['step_s']:.2f} |")
    print("(MiB; RSS sampled after each forward, backward and optimizer step)")


if __name__ == "__main__":
    main()
