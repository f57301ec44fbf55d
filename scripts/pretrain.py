"""Pretrain a model with the one training loop.

CPU, bundled data (generates the default corpus, tokenizer and shards under --work first):
    python scripts/pretrain.py --out out/pretrain
GPU, minimind data:
    python scripts/pretrain.py --data pretrain_hq.jsonl --tokenizer path/to/tokenizer \
        --preset minimind-26m --device cuda --dtype bf16 --batch-size 32 --seq-len 512 --steps 20000
Multi-GPU: torchrun --nproc_per_node 8 scripts/pretrain.py ... (DDP; rank 0 logs and saves).
Resume: the same command with --resume continues from the latest checkpoint in --out.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmcore.model.config import PRESETS, get_config  # noqa: E402
from llmcore.train.loop import TrainConfig  # noqa: E402
from llmcore.train.stage_cli import parse_every  # noqa: E402
from llmcore.train.pretrain import pretrain  # noqa: E402


def add_train_args(p, steps=600, batch_size=16, lr=2e-3, seq_len=256):
    p.add_argument("--out", default="out/pretrain", help="checkpoints, log.jsonl, loss.png, tensorboard")
    p.add_argument("--work", default="out/data", help="where the bundled corpus / tokenizer / shards go")
    p.add_argument("--data", nargs="*", help="jsonl file(s) in minimind's format instead of the bundled corpus")
    p.add_argument("--tokenizer", help="tokenizer directory (required with --data unless trained here)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--backend", default="llmcore", choices=["llmcore", "torch"])
    p.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=batch_size, help="micro-batch per rank")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=seq_len)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wandb", default="", help="wandb project (if wandb is installed)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--allow-schedule-change", action="store_true",
                   help="with --resume: continue even though --steps/--lr/--warmup/--batch-size/... differ from the "
                        "checkpoint's (refused by default: it changes the schedule of the part already trained)")
    p.add_argument("--max-bad-steps", type=int, default=5,
                   help="stop (non-zero exit) after this many consecutive steps with a NaN/inf loss or gradient "
                        "norm; each such step is skipped, not applied")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed jsonl lines instead of failing")
    p.add_argument("--fsdp", action="store_true", help="FSDP2: shard parameters, gradients and optimizer states over "
                   "the ranks (torchrun); sharded checkpoints resume on any number of ranks")
    p.add_argument("--fsdp-offload", action="store_true", help="with --fsdp: keep them in CPU memory between uses")
    p.add_argument("--grad-checkpointing", nargs="?", const="every", default=None, metavar="every|N",
                   help="recompute block activations in the backward (every block, or every N-th): less memory, "
                        "~1/3 more compute")


def train_config(a, **extra_meta) -> TrainConfig:
    return TrainConfig(out_dir=a.out, max_steps=a.steps, batch_size=a.batch_size, grad_accum=a.grad_accum, lr=a.lr,
                       warmup_steps=a.warmup, weight_decay=a.weight_decay, grad_clip=a.grad_clip, dtype=a.dtype,
                       device=a.device, seed=a.seed, log_every=a.log_every, eval_every=a.eval_every,
                       save_every=a.save_every, keep_last=a.keep_last, wandb=a.wandb, progress=not a.no_progress,
                       max_bad_steps=a.max_bad_steps, allow_schedule_change=a.allow_schedule_change,
                       grad_checkpointing=parse_every(a.grad_checkpointing), fsdp=a.fsdp or a.fsdp_offload,
                       fsdp_offload=a.fsdp_offload,
                       extra_meta=extra_meta)


def shards(a, kind):
    """(shard dir, tokenizer dir) for `kind` ("pretrain" | "sft"): the bundled data, or --data prepared."""
    from llmcore.data import prep
    from llmcore.data.tokenizer import Tokenizer, train_tokenizer

    if not a.data:
        d = prep.prepare_default_data(a.work, seed=0, progress=False)
        return d[kind], str(d["tokenizer_dir"])
    work = Path(a.work)
    tok_dir = a.tokenizer or str(work / "tokenizer")
    if a.tokenizer:
        tok = Tokenizer.load(tok_dir)
    elif (work / "tokenizer").exists():
        tok = Tokenizer.load(tok_dir)
    else:
        tok = train_tokenizer(a.data, 6400, tok_dir)
    out = work / f"{kind}_{Path(a.data[0]).stem}"
    prep.prepare_cached(kind, a.data, tok, out, strict=not a.skip_bad, progress=not a.no_progress)
    return out, tok_dir


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(p)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--vocab-size", type=int, default=0, help="default: the tokenizer's size rounded up to 64")
    a = p.parse_args(argv)
    shard, tok_dir = shards(a, "pretrain")
    from llmcore.data.tokenizer import Tokenizer

    vocab = a.vocab_size or -(-len(Tokenizer.load(tok_dir)) // 64) * 64
    mcfg = get_config(a.preset, vocab_size=vocab, backend=a.backend, max_seq_len=max(a.seq_len, 256))
    cfg = train_config(a, tokenizer=str(Path(tok_dir).resolve()), stage="pretrain")
    model, hist = pretrain(shard, mcfg, cfg, seq_len=a.seq_len, resume=a.resume)
    if hist["losses"]:
        print(f"pretrain: {hist['step']} steps, final loss {hist['losses'][-1][1]:.4f}, "
              f"{hist['tokens'] / max(hist['seconds'], 1e-9):,.0f} tokens/s, checkpoints in {a.out}")


if __name__ == "__main__":
    from llmcore.train.stage_cli import run_cli

    run_cli(main)
