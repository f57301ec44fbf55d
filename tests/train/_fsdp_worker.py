"""Worker for test_fsdp: `torchrun --nproc_per_node N -m tests.train._fsdp_worker OUT MODE [STEPS] [STOP]`.

MODE "train": an FSDP2 run of the tiny test model on UnevenLabels with a global batch of 6 (6 // N per
rank) for STEPS steps, stopping (and saving) after STOP, or resuming from OUT/run when it holds a
checkpoint; rank 0 writes the losses to OUT/losses_<N>_<first step>.json and every rank the items it
read to OUT/seen_<N>_<rank>_<first step>.json. MODE "lora": the same with LoRA adapters on the model.
MODE "crash": rank 1 dies (os._exit) right after writing its shards of the step-2 checkpoint."""
import json
import sys

import torch
import torch.distributed as dist

from llmcore.train import checkpoint
from llmcore.train.loop import train
from tests.train.test_loop import tiny_model, toy_config
from tests.train.test_loss_normalization import UnevenLabels


class Logged(UnevenLabels):
    def __init__(self):
        super().__init__(n=48)
        self.seen = []

    def __getitem__(self, i):
        self.seen.append(int(i))
        return super().__getitem__(i)


if __name__ == "__main__":
    out, mode = sys.argv[1], sys.argv[2]
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 6
    stop = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    world_env = int(__import__("os").environ.get("WORLD_SIZE", "1"))
    model = tiny_model()
    if mode == "lora":
        from llmcore.train.lora import prepare_lora

        prepare_lora(model)
    data = Logged()
    if mode == "crash":
        import os

        import torch.distributed.checkpoint as dcp

        real = dcp.save

        def dying_save(state, checkpoint_id=None, **kw):
            real(state, checkpoint_id=checkpoint_id, **kw)
            if dist.get_rank() == 1 and "ckpt-00000002" in str(checkpoint_id):
                os._exit(3)
        dcp.save = dying_save
    resume = checkpoint.latest_checkpoint(f"{out}/run") is not None
    hist = train(model, data, toy_config(f"{out}/run", max_steps=steps, stop_at_step=stop, batch_size=6 // world_env,
                                         fsdp=True, save_every=1, keep_last=2, lr=1e-2), resume=resume)
    rank, world = dist.get_rank(), dist.get_world_size()
    first = hist["losses"][0][0] if hist["losses"] else 0
    if rank == 0:
        json.dump(hist["losses"], open(f"{out}/losses_{world}_{first}.json", "w"))
    json.dump(data.seen, open(f"{out}/seen_{world}_{rank}_{first}.json", "w"))
    dist.barrier()
    dist.destroy_process_group()
