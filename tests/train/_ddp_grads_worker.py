"""Worker for test_loss_normalization: `torchrun --nproc_per_node 2 -m tests.train._ddp_grads_worker OUT`
runs one DDP step (batch 2 per rank; then batch 1 x 2 micro-batches per rank) over gloo and rank 0
saves the gradients the optimizer is handed."""
import sys

import torch
import torch.distributed as dist

import llmcore.train.loop as loop
from tests.train.test_loop import tiny_model, toy_config
from tests.train.test_loss_normalization import GradRecorder, UnevenLabels

if __name__ == "__main__":
    out = sys.argv[1]
    for name, bs, acc in (("ddp_grads", 2, 1), ("ddp_grads_accum", 1, 2)):
        rec = {}

        def build(model, *a, **k):
            rec["opt"] = GradRecorder(model.parameters())
            return rec["opt"]

        loop.build_optimizer = build
        loop.train(tiny_model(), UnevenLabels(), toy_config(f"{out}/{name}", max_steps=1, batch_size=bs, grad_accum=acc,
                                                          grad_clip=0.0))
        if dist.get_rank() == 0:
            torch.save(rec["opt"].seen[0], f"{out}/{name}.pt")
        dist.barrier()
    dist.destroy_process_group()
