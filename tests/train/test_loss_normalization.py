"""A step's gradient is the single-process gradient of its global batch, however the batch is split:
the loss is normalized by the step's global number of labelled tokens, across gradient-accumulation
micro-batches and DDP ranks (rows here carry very different numbers of labels, as packed documents
with -100 boundaries and SFT masks do)."""
import os
import subprocess
import sys
from pathlib import Path

import torch

import llmcore.train.loop as loop
from tests.train.test_loop import tiny_model, toy_config

ROOT = Path(__file__).resolve().parents[2]


class UnevenLabels:
    """Rows of 32 tokens whose first k_i labels are -100, k_i from 0 to 28."""

    def __init__(self, n=32, seq=32, seed=3):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, 256, (n, seq + 1), generator=g)
        self.k = torch.randint(0, 29, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        x = self.ids[i]
        labels = x[1:].clone()
        labels[: int(self.k[i])] = -100
        return {"input_ids": x[:-1], "labels": labels}


class GradRecorder(torch.optim.Optimizer):
    """An optimizer that only records the gradients it is handed (lr irrelevant)."""

    def __init__(self, params):
        super().__init__(list(params), {})
        self.seen = []

    def step(self, closure=None):
        self.seen.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])


def step_grads(tmp_path, monkeypatch, batch_size, grad_accum, steps=1):
    rec = {}

    def build(model, *a, **k):
        rec["opt"] = GradRecorder(model.parameters())
        return rec["opt"]

    monkeypatch.setattr(loop, "build_optimizer", build)
    loop.train(tiny_model(), UnevenLabels(), toy_config(tmp_path / f"b{batch_size}a{grad_accum}", max_steps=steps,
                                                      batch_size=batch_size, grad_accum=grad_accum, grad_clip=0.0))
    return rec["opt"].seen


def _close(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def test_accumulation_gives_the_big_batch_gradient(tmp_path, monkeypatch):
    big = step_grads(tmp_path, monkeypatch, 4, 1, steps=2)
    for bs, acc in ((2, 2), (1, 4)):
        split = step_grads(tmp_path, monkeypatch, bs, acc, steps=2)
        for g_big, g_split in zip(big, split):
            _close(g_big, g_split)


def test_ddp_gives_the_single_process_gradient(tmp_path, monkeypatch):
    want = step_grads(tmp_path, monkeypatch, 4, 1, steps=1)[0]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                    "-m", "tests.train._ddp_grads_worker", str(tmp_path)], check=True, env=env, cwd=ROOT,
                   capture_output=True, timeout=300)
    got = torch.load(tmp_path / "ddp_grads.pt", weights_only=True)
    _close(want, got)
    got_acc = torch.load(tmp_path / "ddp_grads_accum.pt", weights_only=True)  # 2 ranks x 2 micro-batches of 1
    _close(want, got_acc)
