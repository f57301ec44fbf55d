"""Worker for test_ddp: `torchrun --nproc_per_node 2 -m tests.train._ddp_worker OUT` trains 2 steps
with DDP over gloo and rank 0 writes the final weights to OUT/weights.pt."""
import sys

import torch
import torch.distributed as dist

from tests.train.test_loop import tiny_model, toy_data, toy_config

if __name__ == "__main__":
    out = sys.argv[1]
    model = tiny_model()
    from llmcore.train.loop import train

    hist = train(model, toy_data(), toy_config(out + "/ddp", batch_size=2, max_steps=2))
    if dist.get_rank() == 0:
        torch.save({"state": model.state_dict(), "losses": hist["losses"]}, out + "/weights.pt")
    dist.barrier()
    dist.destroy_process_group()
