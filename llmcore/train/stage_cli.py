"""Shared argparse pieces of the post-SFT stage scripts (scripts/lora.py, dpo.py, distill.py,
distill_reason.py): the default data (llmcore.data.prep.prepare_default_data under --workdir, cached),
the starting checkpoint, the TrainConfig, and memory reporting.

Peak memory: resource.getrusage(RUSAGE_SELF).ru_maxrss — the process's peak resident set (KiB on
Linux), which on CPU covers weights, grads, optimizer state and activations (plus the ~0.3 GB of
the torch runtime itself); on CUDA also torch.cuda.max_memory_allocated.
"""
import argparse
import resource
import time
from pathlib import Path

import torch


def add_common_args(p: argparse.ArgumentParser, init_help="SFT checkpoint (dir or run dir) to start from"):
    p.add_argument("--init", required=True, help=init_help)
    p.add_argument("--workdir", default=None, help="default data + tokenizer (default: the data dir the --init "
                   "checkpoint was trained from, else out/data; made on first use)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the one recorded in the --init "
                   "checkpoint's meta, else <workdir>/tokenizer)")
    p.add_argument("--data", default=None, help="training jsonl in minimind's format (default: the bundled set)")
    p.add_argument("--eval-data", default=None, help="held-out jsonl (default: the bundled held-out set; with --data: "
                   "the last records of --data, held out of training)")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed jsonl lines instead of failing")
    p.add_argument("--max-bad-steps", type=int, default=5,
                   help="stop (non-zero exit) after this many consecutive steps with a NaN/inf loss or gradient norm")
    p.add_argument("--grad-checkpointing", nargs="?", const="every", default=None, metavar="every|N",
                   help="recompute block activations in the backward (every block, or every N-th)")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 over the torchrun ranks (sharded checkpoints)")
    return p


def _ckpt_tokenizer(init):
    """The tokenizer dir recorded in a checkpoint's meta.json ("tokenizer", as the quick start writes)."""
    if not init:
        return None
    from llmcore.train.checkpoint import latest_checkpoint, load_meta

    p = Path(init)
    ckpt = p if (p / "meta.json").exists() else latest_checkpoint(p)
    tok = load_meta(ckpt).get("tokenizer") if ckpt is not None else None
    return tok if tok and Path(tok).exists() else None


def default_data(args, train_key: str, eval_key: str, init=None):
    """(tokenizer, train jsonl, eval jsonl or None) — the given files, else the bundled corpus. The
    tokenizer defaults to the one the --init checkpoint was trained with, and the bundled corpus to
    the data dir next to it (prepare_default_data caches it there), so stages chain after the quick
    start. With --data the bundled corpus is never generated: the eval file is --eval-data, or None
    (the stage then holds out part of --data, see `holdout`), and the tokenizer must be known."""
    from llmcore.data.tokenizer import Tokenizer

    tok_dir = args.tokenizer or _ckpt_tokenizer(init if init is not None else getattr(args, "init", None))
    if args.data is not None:
        if tok_dir is None:
            raise FileNotFoundError("--data needs a tokenizer: pass --tokenizer (the --init checkpoint records none)")
        return Tokenizer.load(tok_dir), args.data, args.eval_data
    workdir = args.workdir
    if workdir is None:
        near = Path(tok_dir).parent if tok_dir else None
        workdir = near if near is not None and (near / "default_data.json").exists() else "out/data"
    from llmcore.data.prep import prepare_default_data

    print(f"no --data: the bundled corpus in {workdir} (made there on first use)")
    d = prepare_default_data(workdir, progress=False)
    tok = Tokenizer.load(tok_dir) if tok_dir else d["tokenizer"]
    ev = args.eval_data or (d["corpus"][eval_key] if eval_key else None)
    return tok, d["corpus"][train_key], ev


def holdout(path, n: int, what: str, skip_bad: bool = False):
    """(train records, held-out records): the last n records of a jsonl file are held out for
    evaluation (at most a tenth of it), as raw objects for ChatDataset / PairDataset / read_jsonl."""
    from llmcore.train.chatdata import read_jsonl

    recs = read_jsonl(path, "json", skip_bad)
    n = max(1, min(n, len(recs) // 10))
    if len(recs) < 2:
        raise ValueError(f"{path}: {len(recs)} record(s): too few to hold any out for {what}; pass --eval-data")
    print(f"no --eval-data: {what} on the last {n} of the {len(recs)} records of {path}, held out of training")
    return recs[:-n], recs[-n:]


def load_init(path, device="cpu"):
    from llmcore.train.checkpoint import load_model

    return load_model(path, device=device)


def stage_meta(tok, stage: str) -> dict:
    """What every checkpoint a stage writes records beside its weights, so chat / eval / export /
    serve find the tokenizer: {"tokenizer": its directory, "stage": name}."""
    return {"stage": stage, **({"tokenizer": str(tok.source_dir)} if getattr(tok, "source_dir", None) else {})}


def parse_every(v) -> int:
    """--grad-checkpointing's value: None -> 0 (off), "every" -> 1, "N" -> N."""
    if v is None:
        return 0
    if v == "every":
        return 1
    if not str(v).isdigit() or int(v) < 1:
        raise SystemExit(f"--grad-checkpointing takes 'every' or a positive integer, got {v!r}")
    return int(v)


def train_config(args, default_lr: float, tok=None, stage: str = "", **kw):
    """The TrainConfig of a stage CLI; `tok` and `stage` go into every checkpoint's meta."""
    from llmcore.train.loop import TrainConfig

    if tok is not None:
        kw["extra_meta"] = {**stage_meta(tok, stage), **kw.get("extra_meta", {})}
    return TrainConfig(out_dir=args.out, max_steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                       lr=args.lr if args.lr is not None else default_lr, warmup_steps=min(20, args.steps // 10),
                       dtype=args.dtype, device=args.device, seed=args.seed, log_every=args.log_every,
                       progress=not args.no_progress, max_bad_steps=args.max_bad_steps,
                       grad_checkpointing=parse_every(args.grad_checkpointing), fsdp=args.fsdp, **kw)


def user_errors() -> tuple:
    """The exceptions a CLI reports as one `error: ...` line (exit status 1) instead of a traceback:
    bad data (file:line), missing or unsafe files, a diverged run, a refused resume."""
    from llmcore.data.jsonl import BadLine, NoData
    from llmcore.train.checkpoint import CheckpointError, NonFiniteWeights
    from llmcore.train.loop import ScheduleMismatch, TrainingDiverged

    return (BadLine, NoData, CheckpointError, NonFiniteWeights, ScheduleMismatch, TrainingDiverged, FileNotFoundError)


def run_cli(main):
    """Run a script's main(); the errors of `user_errors()` exit with status 1 and their message."""
    try:
        return main()
    except user_errors() as e:
        raise SystemExit(f"error: {e}") from None


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_report(tag: str, model=None) -> str:
    parts = [f"[{tag}] peak RSS {peak_rss_mb():.0f} MiB"]
    if model is not None:
        nbytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        parts.append(f"model tensors {nbytes / 2**20:.1f} MiB")
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        parts.append(f"CUDA allocated {torch.cuda.memory_allocated() / 2**20:.0f} MiB "
                     f"(peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB)")
    return ", ".join(parts)


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *a):
        self.seconds = time.perf_counter() - self.t0


def save_plain(model, out_dir, step: int, meta=None):
    """A weights-only checkpoint loadable by llmcore.train.checkpoint.load_model (e.g. merged LoRA)."""
    from llmcore.train.checkpoint import save_checkpoint

    return save_checkpoint(Path(out_dir), step, model, meta=meta)
