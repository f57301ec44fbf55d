"""The one training loop, shared by every stage (pretrain, SFT, and later LoRA/DPO/distillation).

    train(model, dataset, cfg, loss_fn=lm_loss, eval_dataset=None) -> history

A stage is a loss function `loss_fn(model, batch) -> (loss, metrics)` (metrics: a dict of floats
or 0-d tensors, averaged over the log interval) plus whatever it does to the model before calling
train(). The loop owns everything else:

- precision: cfg.dtype "bf16" (autocast, CPU and GPU), "fp16" (autocast + GradScaler), "fp32";
  parameters and optimizer state stay fp32;
- one normalization for every way a step is split: the step's loss is the mean over all the loss
  units (labelled tokens by default; `loss_fn.units(batch)` says otherwise, e.g. DPO's pairs) of
  all its gradient-accumulation micro-batches on all ranks, so its gradient equals the
  single-process gradient of the same global batch: each micro-batch's mean loss is weighted by
  its units * world / (the step's global units, all-reduced before the first backward; DDP then
  averages over ranks). A micro-batch without a unit contributes nothing; a step without one is
  skipped (not counted as diverged);
- gradient accumulation (cfg.grad_accum micro-batches per optimizer step), clipping, AdamW with
  decay groups, warmup + cosine (llmcore.train.optim);
- data order: a seeded permutation per epoch, split across ranks; its position (epoch, cursor) is
  checkpointed so --resume continues with the very next batch;
- a tqdm bar (loss, lr, tokens/s), tensorboard (if importable), wandb (if cfg.wandb and installed),
  <out>/log.jsonl, periodic held-out eval loss, a loss-curve PNG at the end (if matplotlib);
- checkpoints every cfg.save_every steps and at the end (llmcore.train.checkpoint), resume from the
  latest one with resume=True: weights, optimizer, scaler, RNG, data position, step — the losses
  after a resume equal those of an uninterrupted run. A resume whose schedule settings (steps, lr,
  warmup, batch, accumulation, seed: SCHEDULE_FIELDS) differ from the checkpoint's is refused
  unless cfg.allow_schedule_change, and then warned about: it would silently change the learning
  rate of the part already trained (or the data order);
- non-finite steps: a step whose loss or gradient norm is NaN/inf is skipped (no optimizer update,
  as GradScaler does for fp16 overflow; with fp16 an overflow of the gradients alone is left to the
  scaler, which skips and lowers its scale), counted ("skipped_steps" in the log), and after
  cfg.max_bad_steps consecutive ones the run stops with TrainingDiverged naming the step, without
  writing a checkpoint; non-finite values appear in log.jsonl as null (it stays valid JSON);
- torchrun: DDP over gloo (CPU) or NCCL (CUDA), gradients all-reduced on the last micro-batch only
  (no_sync before), rank 0 logs and saves.
"""
import dataclasses
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from llmcore.train import checkpoint as ckpt_mod
from llmcore.train.optim import build_optimizer, lr_at


@dataclass
class TrainConfig:
    out_dir: str = "out/run"
    max_steps: int = 1000            # optimizer steps (the schedule's length)
    batch_size: int = 8              # micro-batch per rank
    grad_accum: int = 1
    lr: float = 5e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0           # 0 = off
    dtype: str = "bf16"              # "bf16" | "fp16" | "fp32"
    device: str = "cpu"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0              # 0 = only at the end (when an eval dataset is given)
    eval_batches: int = 20
    save_every: int = 0              # 0 = only at the end
    keep_last: int = 2
    stop_at_step: int = 0            # stop (and save) after this step without changing the schedule
    progress: bool = True
    tensorboard: bool = True
    wandb: str = ""                  # wandb project name; empty = off
    plot: bool = True
    max_bad_steps: int = 5           # consecutive non-finite steps (skipped) before TrainingDiverged
    grad_checkpointing: int = 0      # recompute every N-th block's activations in the backward (0 = off)
    fsdp: bool = False               # FSDP2 fully_shard per block + root (torchrun; one process works too)
    fsdp_offload: bool = False       # FSDP2 CPU offload of parameters, gradients and optimizer states
    allow_schedule_change: bool = False  # resume with different SCHEDULE_FIELDS (warned) instead of refusing
    extra_meta: dict = field(default_factory=dict)  # stored in each checkpoint's meta.json


# TrainConfig fields that fix the learning-rate schedule or the data order of a run (with the global
# batch, batch_size * grad_accum * world: how it is split across ranks and micro-batches may change)
SCHEDULE_FIELDS = ("max_steps", "lr", "min_lr_ratio", "warmup_steps", "seed")


class TrainingDiverged(RuntimeError):
    """cfg.max_bad_steps consecutive optimizer steps had a non-finite loss or gradient norm."""


class ScheduleMismatch(ValueError):
    """--resume with schedule settings that differ from the checkpoint's."""


def _finite_or_none(v):
    return v if not isinstance(v, float) or math.isfinite(v) else None


def _json_row(row: dict) -> str:
    """One log.jsonl line: non-finite floats as null, so the file stays valid JSON."""
    return json.dumps({k: _finite_or_none(float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                       for k, v in row.items()}, allow_nan=False)


def check_schedule(saved_meta: dict, cfg, ckpt, world: int = 1) -> list:
    """The SCHEDULE_FIELDS (and the global batch) whose value in a checkpoint's meta differs from
    cfg's, as "name: saved -> now" strings; raises ScheduleMismatch unless cfg.allow_schedule_change."""
    saved = saved_meta.get("train_config") or {}
    diffs = [f"{k}: {saved[k]!r} -> {getattr(cfg, k)!r}" for k in SCHEDULE_FIELDS
             if k in saved and saved[k] != getattr(cfg, k)]
    if "batch_size" in saved:
        was = saved["batch_size"] * saved.get("grad_accum", 1) * saved_meta.get("world", 1)
        now = cfg.batch_size * cfg.grad_accum * world
        if was != now:
            diffs.append(f"global batch (batch_size x grad_accum x ranks): {was} -> {now}")
    if diffs and not cfg.allow_schedule_change:
        raise ScheduleMismatch(f"{ckpt}: --resume with a different schedule ({'; '.join(diffs)}) would change the "
                               f"learning rate / data order of the steps already trained. Resume with the original "
                               f"settings, or pass --allow-schedule-change to continue on the new schedule.")
    return diffs


def loss_units(loss_fn, batch) -> float:
    """How many units the mean loss of `batch` averages over: loss_fn.units(batch) when the loss
    function defines it, else the labelled tokens (labels != -100), else the rows."""
    f = getattr(loss_fn, "units", None)
    if f is not None:
        return float(f(batch))
    if "labels" in batch:
        return float((batch["labels"] != -100).sum())
    return float(batch["input_ids"].shape[0])


def lm_loss(model, batch):
    """Next-token cross-entropy (the pretrain and SFT loss): batch has input_ids, labels, positions."""
    _, loss = model(batch["input_ids"], positions=batch.get("positions"), labels=batch["labels"])
    return loss, {}


def default_collate(items):
    """Stack a list of dicts of equal-shape tensors into a dict of batched tensors."""
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}


class BatchStream:
    """Deterministic, resumable batches, re-splittable across world sizes: epoch e reads a
    permutation of the items seeded by (seed, e); the epoch is consumed from its start in global
    steps of batch_size * world items, rank r taking every world-th of the next ones (rank r's
    micro-batch = order[consumed + r + world * j], j < batch_size). The state is the epoch and the
    global count of items consumed, so a run resumed on another number of ranks (with the same global
    batch) continues on exactly the items not yet seen, none twice. A tail too short for a full
    global step is skipped."""

    def __init__(self, dataset, batch_size, seed=0, rank=0, world=1, collate=default_collate, shuffle=True):
        self.dataset, self.batch_size, self.seed, self.rank, self.world = dataset, batch_size, seed, rank, world
        self.collate, self.shuffle = collate, shuffle
        self.epoch, self.consumed, self._order = 0, 0, None
        self.usable = (len(dataset) // world) * world
        self.per_epoch = (len(dataset) // world) // batch_size
        if self.per_epoch == 0:
            raise ValueError(f"dataset of {len(dataset)} items is too small for batch_size {batch_size} x {world} ranks")

    def _indices(self):
        if self._order is None:
            n = len(self.dataset)
            if self.shuffle:
                order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch))
            else:
                order = torch.arange(n)
            self._order = order.tolist()
        return self._order

    def next_indices(self) -> list:
        step = self.batch_size * self.world
        if self.consumed + step > self.usable:
            self.epoch, self.consumed, self._order = self.epoch + 1, 0, None
        order = self._indices()
        idx = [order[self.consumed + self.rank + self.world * j] for j in range(self.batch_size)]
        self.consumed += step
        return idx

    def next(self):
        return self.collate([self.dataset[i] for i in self.next_indices()])

    def state_dict(self):
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, s):
        # "cursor" (micro-batches per rank): checkpoints written before the state became global
        consumed = s["consumed"] if "consumed" in s else s["cursor"] * self.batch_size * self.world
        self.epoch, self.consumed, self._order = s["epoch"], int(consumed), None


def _to(batch, device):
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _autocast(device, dtype):
    dev = torch.device(device).type
    if dtype == "fp32":
        return nullcontext()
    return torch.autocast(dev, dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)


def _dist_setup(device, need_group: bool = False):
    """(rank, world, device) — initializes the process group under torchrun (or, when need_group,
    a group of one for a single process: FSDP needs one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not (need_group or dist.is_initialized()):
        return 0, 1, device
    if not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend)
        else:
            import tempfile

            store = tempfile.NamedTemporaryFile(prefix="llmcore-pg-", delete=False).name
            dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    world = dist.get_world_size()
    rank = dist.get_rank()
    if torch.device(device).type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return rank, world, device


@torch.no_grad()
def evaluate(model, dataset, cfg, loss_fn=lm_loss, collate=default_collate, device=None):
    """Mean loss over the first cfg.eval_batches batches of dataset (fixed order)."""
    device = device or cfg.device
    was = model.training
    model.eval()
    stream = BatchStream(dataset, min(cfg.batch_size, len(dataset)), collate=collate, shuffle=False)
    total, n = 0.0, 0
    for _ in range(min(cfg.eval_batches, stream.per_epoch)):
        with _autocast(device, cfg.dtype):
            loss, _ = loss_fn(model, _to(stream.next(), device))
        total, n = total + float(loss), n + 1
    model.train(was)
    return total / max(n, 1)


class _Loggers:
    """tensorboard / wandb / log.jsonl on rank 0; all optional."""

    def __init__(self, cfg, out, enabled, start_step):
        self.tb = self.wb = None
        self.path, self.enabled = out / "log.jsonl", enabled
        if not enabled:
            return
        if self.path.exists():  # keep the history up to the resumed step only
            rows = [l for l in self.path.read_text().splitlines() if l and json.loads(l).get("step", 0) <= start_step]
            self.path.write_text("".join(r + "\n" for r in rows))
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out / "tb"))
            except ImportError:
                pass
        if cfg.wandb:
            try:
                import wandb
                self.wb = wandb.init(project=cfg.wandb, config=dataclasses.asdict(cfg), resume="allow")
            except ImportError:
                print("wandb is not installed; logging to tensorboard/log.jsonl only")

    def log(self, step, row):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(_json_row({"step": step, **row}) + "\n")
        for k, v in row.items():
            if self.tb is not None and v is not None:
                self.tb.add_scalar(k, v, step)
        if self.wb is not None:
            self.wb.log(row, step=step)

    def close(self):
        if self.tb is not None:
            self.tb.close()
        if self.wb is not None:
            self.wb.finish()


def plot_losses(log_path, png_path):
    """Loss curve (train, and eval when present) from log.jsonl; needs matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [json.loads(l) for l in Path(log_path).read_text().splitlines() if l]
    tr = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    ev = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if tr:
        ax.plot(*zip(*tr), label="train")
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def shard_model(model, cfg, device):
    """FSDP2: fully_shard every block, then the root (embedding, final norm, head), with a
    mixed-precision policy of bf16 parameters for compute when cfg.dtype is bf16 and fp32 gradient
    reduction, and CPU offload when cfg.fsdp_offload. Frozen parameters (LoRA's base, QLoRA's NF4
    buffers stay replicated) shard as the rest. The custom ops see the gathered, plain tensors."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if cfg.dtype == "fp16":
        raise ValueError("--fsdp with fp16 is not supported (GradScaler over sharded gradients): use --dtype bf16")
    kw = dict(mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cfg.dtype == "bf16" else None,
                                             reduce_dtype=torch.float32),
              offload_policy=CPUOffloadPolicy() if cfg.fsdp_offload else OffloadPolicy())
    for block in getattr(model, "layers", []):
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def train(model, dataset, cfg: TrainConfig, loss_fn=lm_loss, eval_dataset=None, collate=default_collate,
          resume=False, after_step=None):
    """Train `model` on `dataset` (indexable; items are dicts of tensors) for cfg.max_steps optimizer
    steps. after_step(step, model) runs after each optimizer step (e.g. MoE bias updates).
    Returns {"losses": [(step, loss)], "eval": [(step, loss)], "step", "tokens", "seconds"}."""
    rank, world, device = _dist_setup(cfg.device, need_group=cfg.fsdp)
    is_main = rank == 0
    torch.manual_seed(cfg.seed)
    model.to(device)
    if cfg.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ValueError("grad_checkpointing needs an llmcore Transformer (set_grad_checkpointing)")
        model.set_grad_checkpointing(cfg.grad_checkpointing)
    out = Path(cfg.out_dir)
    last = ckpt_mod.latest_checkpoint(out) if resume else None
    sharded_ckpt = last is not None and (last / "dcp").is_dir()
    if last is not None and not sharded_ckpt:
        ckpt_mod.load_weights(model, last)  # before any wrapping (an FSDP run may resume a plain checkpoint)
    raw = model
    if cfg.fsdp:
        shard_model(model, cfg, device)  # in place: raw is the sharded module
    elif world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[torch.device(device).index] if "cuda" in str(device) else None)
    opt = build_optimizer(raw, cfg.lr, cfg.weight_decay, cfg.betas)
    dev_type = torch.device(device).type
    scaler = torch.amp.GradScaler(dev_type) if cfg.dtype == "fp16" else None
    data = BatchStream(dataset, cfg.batch_size, cfg.seed, rank, world, collate)
    step, tokens = 0, 0
    if last is not None:
        saved_meta = ckpt_mod.load_meta(last)
        diffs = check_schedule(saved_meta, cfg, last, world)
        if sharded_ckpt:
            if not cfg.fsdp:
                raise ckpt_mod.CheckpointError(f"{last}: a sharded (FSDP) checkpoint: resume it with --fsdp (any number "
                                               f"of ranks), or export it / load_model it for a plain model")
            st = ckpt_mod.load_sharded_state(last, raw, opt)
        elif cfg.fsdp and (last / "train_state.pt").exists():
            st = ckpt_mod.load_train_state(last, None, None)  # weights loaded above; a fresh optimizer
            if is_main:
                print(f"note: {last} is a plain checkpoint: FSDP resumes its weights with a fresh optimizer state")
        else:
            st = ckpt_mod.load_train_state(last, opt, scaler)
        step, tokens = st["step"], saved_meta.get("tokens", 0)
        data.load_state_dict(st["data"])
        if is_main:
            print(f"resumed from {last} (step {step}, {tokens} tokens)")
            if diffs:
                print(f"WARNING: resuming on a changed schedule ({'; '.join(diffs)}): steps 1-{step} were "
                      f"trained on the old one", file=sys.stderr)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    loggers = _Loggers(cfg, out, is_main, step)
    end = cfg.max_steps if not cfg.stop_at_step else min(cfg.max_steps, cfg.stop_at_step)
    bar = None
    if is_main and cfg.progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=cfg.max_steps, initial=step, dynamic_ncols=True, desc=out.name)
        except ImportError:
            pass
    history = {"losses": [], "eval": []}
    meta = lambda: {"tokens": tokens, "world": world, "train_config": dataclasses.asdict(cfg), **cfg.extra_meta}  # noqa: E731

    def save():
        if cfg.fsdp:  # every rank writes its shards
            ckpt_mod.save_checkpoint_sharded(out, step, raw, opt, data.state_dict(), meta(), cfg.keep_last)
            return
        if is_main:
            ckpt_mod.save_checkpoint(out, step, raw, opt, scaler, data.state_dict(), meta(), cfg.keep_last)
        if world > 1:
            dist.barrier()

    model.train()
    t0 = t_log = time.perf_counter()
    tok_log, acc_loss, acc_metrics, n_acc = 0, 0.0, {}, 0
    skipped, bad_run = 0, 0  # non-finite steps skipped: in all, and in a row
    while step < end:
        lr = lr_at(step, cfg.max_steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        batches = [_to(data.next(), device) for _ in range(cfg.grad_accum)]
        units = [loss_units(loss_fn, b) for b in batches]
        total = torch.tensor(sum(units), dtype=torch.float64, device=device)
        if world > 1:  # the step's global number of loss units, before any backward
            dist.all_reduce(total)
        total = float(total)
        step_loss = torch.zeros((), dtype=torch.float32, device=device)
        for micro, (batch, n) in enumerate(zip(batches, units)):
            sync = world == 1 or micro == cfg.grad_accum - 1
            if cfg.fsdp:  # FSDP2 reduce-scatters on the last micro-batch only
                model.set_requires_gradient_sync(sync or world == 1)
                sync = True
            with (nullcontext() if sync else model.no_sync()), _autocast(device, cfg.dtype):
                loss, metrics = loss_fn(model, batch)
            if n > 0:
                scaled = loss * (n * world / total)
                step_loss += loss.detach().float() * (n / total)
            else:  # nothing to learn here; still a backward, so every DDP rank reduces the same buckets
                scaled = loss.nan_to_num(0.0) * 0.0
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
            for k, v in metrics.items():
                acc_metrics[k] = acc_metrics.get(k, 0.0) + float(v) / cfg.grad_accum
            n_tok = batch["input_ids"].numel() * world
            tokens += n_tok
            tok_log += n_tok
        if scaler is not None:
            scaler.unscale_(opt)
        gnorm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if world > 1:  # the logged loss is the global mean (and every rank takes the same skip decision)
            dist.all_reduce(step_loss)
        loss_val, gnorm_val = float(step_loss), float(gnorm)
        # fp16: gradients that overflow with a finite loss are the scaler's to skip (it lowers its scale)
        bad = not math.isfinite(loss_val) or (scaler is None and not math.isfinite(gnorm_val))
        empty = total == 0  # no loss unit anywhere in the step: nothing to apply, and not a divergence
        if empty:
            loss_val = float("nan")
            if scaler is not None:
                scaler.update()
        elif bad:
            skipped, bad_run = skipped + 1, bad_run + 1
            if scaler is not None:
                scaler.update()  # lowers the scale after the inf/NaN seen by unscale_
        else:
            bad_run = 0
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bad = bad and not empty
        if bad and is_main:
            what = "loss" if not math.isfinite(loss_val) else "gradient norm"
            msg = f"step {step}: non-finite {what} (loss {loss_val:.4g}, grad norm {gnorm_val:.4g}): optimizer step " \
                  f"skipped ({bad_run} in a row, {skipped} in all)"
            (bar.write if bar is not None else print)(msg)
        if bad_run >= max(1, cfg.max_bad_steps):
            loggers.log(step, {"loss": loss_val, "grad_norm": gnorm_val, "skipped_steps": skipped})
            loggers.close()
            if bar is not None:
                bar.close()
            last = ckpt_mod.latest_checkpoint(out)
            kept = f"the last good checkpoint, {last}, is kept" if last is not None else "no checkpoint was written"
            raise TrainingDiverged(
                f"training diverged: {bad_run} consecutive steps with a non-finite loss or gradient norm, the last "
                f"at step {step} (lr {lr:.3g}); those steps were not applied and {kept}. Lower --lr, check the "
                f"data, or raise --max-bad-steps.")
        if after_step is not None and not (bad or empty):
            after_step(step, raw)
        history["losses"].append((step, loss_val))
        if not (bad or empty):
            acc_loss, n_acc = acc_loss + loss_val, n_acc + 1
        if bar is not None:
            bar.update(1)
        if step % cfg.log_every == 0 or step == end:
            now = time.perf_counter()
            tps = tok_log / max(now - t_log, 1e-9)
            n_log = max(n_acc, 1)
            row = {"loss": acc_loss / n_acc if n_acc else float("nan"), "lr": lr, "grad_norm": gnorm_val,
                   "tokens_per_s": tps, "tokens": tokens, "skipped_steps": skipped,
                   **{k: v / n_log for k, v in acc_metrics.items()}}
            if bar is not None:
                bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
            loggers.log(step, row)
            t_log, tok_log, acc_loss, acc_metrics, n_acc = now, 0, 0.0, {}, 0
        do_eval = eval_dataset is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps)
        if do_eval and (is_main or cfg.fsdp):  # FSDP: every rank takes part in the sharded forward
            ev = evaluate(raw, eval_dataset, cfg, loss_fn, collate, device)
            history["eval"].append((step, ev))
            loggers.log(step, {"eval_loss": ev})
            if bar is not None:
                bar.write(f"step {step}: eval loss {ev:.4f}")
        if (cfg.save_every and step % cfg.save_every == 0 and not bad) or step == end:
            save()
    if bar is not None:
        bar.close()
    loggers.close()
    if is_main and cfg.plot and (out / "log.jsonl").exists():
        plot_losses(out / "log.jsonl", out / "loss.png")
    history.update(step=step, tokens=tokens, seconds=time.perf_counter() - t0, skipped_steps=skipped)
    return history
