"""Peak memory and step time of one training step with and without activation checkpointing, on CPU:
each configuration in a fresh subprocess (peak RSS = ru_maxrss, so one configuration's pages never
count for another), AdamW, bf16 autocast, median step time of the steps after the first, next to the
planner's estimate (llmcore/plan.py memory_bytes).

    PYTHONPATH=$PWD python bench/grad_checkpointing_cpu.py [--preset minimind-104m] [--batch 2] [--seq 512]
"""
import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, torch
from llmcore.model import Transformer, get_config
from llmcore.train.optim import build_optimizer
from llmcore.plan import memory_bytes, arch_from_config
preset, B, T, every, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.manual_seed(0)
torch.set_num_threads(2)
cfg = get_config(preset, max_seq_len=T)
model = Transformer(cfg)
if every:
    model.set_grad_checkpointing(every)
opt = build_optimizer(model, 1e-4)
ids = torch.randint(0, cfg.vocab_size, (B, T))
times, losses = [], []
for _ in range(steps):
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(ids, labels=ids)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t)
    losses.append(loss.item())
plan = memory_bytes(arch_from_config(cfg), "autocast-bf16", batch=B, seq_len=T, checkpointing=every)["total"]
print(json.dumps(dict(rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, times=times, losses=losses, plan=plan)))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="minimind-104m")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    import llmcore
    print(f"{llmcore.build_info()['cpu_model']}, 2 threads; {args.preset} batch {args.batch} x {args.seq}, "
          f"bf16 autocast, AdamW; {args.steps} steps per run")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # freed activations go back to the OS at once
    for every in (0, 1):
        r = subprocess.run([sys.executable, "-c", CHILD, args.preset, str(args.batch), str(args.seq), str(every),
                            str(args.steps)], capture_output=True, text=True, env=env, check=True)
        d = json.loads(r.stdout.strip().splitlines()[-1])
        t = sorted(d["times"][1:])
        print(f"  checkpointing {'every block' if every else 'off':12s}: peak RSS {d['rss'] / 2**20:7.0f} MiB "
              f"(planner {d['plan'] / 2**20:6.0f} MiB), step {t[len(t) // 2]:.2f} s, losses "
              f"{', '.join(f'{x:.4f}' for x in d['losses'])}")


if __name__ == "__main__":
    main()
