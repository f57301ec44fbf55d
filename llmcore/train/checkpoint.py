"""Checkpoints: a directory per step, written atomically, the last N kept.

    <out>/ckpt-00001000/
        model.safetensors   weights (state_dict; the tied lm_head is embed.weight, stored once)
        train_state.pt      optimizer, grad scaler, RNG states (python, numpy, torch, cuda),
                            data position, step — everything --resume needs to continue exactly;
                            tensors and plain types only, loaded with torch.load(weights_only=True)
        meta.json           model config, step, tokens seen, anything the stage adds

Safety: nothing a checkpoint holds can run code when loaded. Weights are safetensors;
train_state.pt is read with `weights_only=True` (a file that would need pickle beyond tensors,
dicts, lists, numbers and strings is refused with CheckpointError naming it).

Durability: the directory is written as <out>/.tmp-ckpt-*, every file and the directory fsync'd,
then renamed into place (os.rename is atomic on one filesystem) and the parent fsync'd: a crash or
power loss during a save leaves the previous checkpoints untouched, and a half-written temporary
directory is never taken for a checkpoint (and is removed by the next save).

Never bad weights over good ones: save_checkpoint refuses weights with a NaN or inf (raising
NonFiniteWeights before anything is written or rotated away), so the newest checkpoint is always
finite and rotation (keep_last) only ever deletes older ones.
"""
import json
import os
import pickle
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from llmcore.model.config import ModelConfig
from llmcore.model.model import Transformer

_CKPT = re.compile(r"^ckpt-(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded safely or does not fit; str() names the file."""


class NonFiniteWeights(ValueError):
    """save_checkpoint was handed weights with a NaN or inf; nothing was written."""


def rng_state() -> dict:
    """Every RNG state as tensors and plain types (what torch.load(weights_only=True) accepts)."""
    version, mt, gauss = random.getstate()
    name, key, pos, has_gauss, cached = np.random.get_state()
    s = {"python": {"version": version, "state": list(mt), "gauss": gauss},
         "numpy": {"name": name, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
         "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict):
    py, npy = s["python"], s["numpy"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    np.random.set_state((npy["name"], npy["key"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _fsync(path: Path):
    """Flush a file or a directory to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def non_finite_tensors(state: dict) -> list:
    """Names of the floating-point tensors of `state` holding a NaN or inf."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def list_checkpoints(out_dir) -> list:
    """Complete checkpoints in out_dir, oldest first."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if p.is_dir() and _CKPT.match(p.name) and (p / "meta.json").exists()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(out_dir):
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def save_checkpoint(out_dir, step: int, model, optimizer=None, scaler=None, data_state=None, meta=None,
                    keep_last: int = 3) -> Path:
    """Write <out_dir>/ckpt-<step> atomically (fsync'd) and delete all but the newest keep_last.
    Raises NonFiniteWeights, writing and deleting nothing, when a weight holds a NaN or inf."""
    out = Path(out_dir)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    bad = non_finite_tensors(state)
    if bad:
        raise NonFiniteWeights(f"refusing to write checkpoint step {step} to {out}: {len(bad)} tensor(s) hold NaN/inf "
                               f"(first: {bad[0]}); the previous checkpoints are kept")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".tmp-ckpt-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-ckpt-{step:08d}-", dir=out))
    try:
        save_file(state, str(tmp / "model.safetensors"))
        if optimizer is not None:
            torch.save({"step": step, "optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict() if scaler is not None else None,
                        "rng": rng_state(), "data": data_state}, tmp / "train_state.pt")
        meta = {"step": step, **(meta or {})}
        if hasattr(model, "cfg"):
            meta.setdefault("model_config", model.cfg.to_dict())
        adapters = adapter_meta(model)
        if adapters:
            meta["adapters"] = adapters
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=2, default=str)
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        final = out / f"ckpt-{step:08d}"
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(out)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def adapter_meta(model):
    """How to rebuild a model that carries LoRA (and, for QLoRA, NF4 bases) from its plain config:
    {"r", "alpha", "dropout", "use_rslora", "targets", "nf4": None | {blocksize, double_quant,
    compute_dtype}}; None for a model without adapters."""
    from llmcore.nn.lora import _config_of, lora_modules

    mods = lora_modules(model)
    if not mods:
        return None
    conf = _config_of(model)
    nf4 = [m.base_layer for _, m in mods if hasattr(m.base_layer, "weight_data")]
    conf["nf4"] = None if not nf4 else {"blocksize": nf4[0].blocksize, "double_quant": nf4[0].weight_absmax2 is not None,
                                        "compute_dtype": str(nf4[0].compute_dtype).replace("torch.", "")}
    return conf


def _with_adapters(model, adapters: dict):
    """Put the LoRA (QLoRA: NF4 base first) layers described by adapter_meta on a plain model."""
    from llmcore.train.lora import prepare_lora, quantize_linears

    nf4 = adapters.get("nf4")
    if nf4:
        quantize_linears(model, adapters["targets"], nf4["blocksize"], nf4["double_quant"],
                         getattr(torch, nf4["compute_dtype"]))
    return prepare_lora(model, adapters["targets"], adapters["r"], adapters["alpha"], adapters["dropout"],
                        adapters["use_rslora"])


def _local(v):
    return v.to_local() if hasattr(v, "to_local") else v


def save_checkpoint_sharded(out_dir, step: int, model, optimizer, data_state=None, meta=None, keep_last: int = 3):
    """The FSDP form of save_checkpoint, called on every rank: model and optimizer state through
    torch.distributed.checkpoint (each rank writes its own shards, in parallel) into
    <out>/ckpt-<step>/dcp, beside train_state.pt (step, RNG of rank 0, data position) and
    meta.json ("format": "dcp"), written by rank 0 into the same temporary directory, fsync'd and
    renamed into place only after every rank finished: a rank that dies mid-save leaves the previous
    checkpoints as they were. Any NaN/inf in any rank's shard: NonFiniteWeights on every rank,
    nothing written. Loads on any number of ranks (load_sharded_state) or none (load_model)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    out, rank = Path(out_dir), dist.get_rank()
    msd, osd = get_state_dict(model, optimizer)
    bad = torch.tensor([float(bool(non_finite_tensors({k: _local(v) for k, v in msd.items()})))])
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item():
        raise NonFiniteWeights(f"refusing to write checkpoint step {step} to {out}: a weight shard holds NaN/inf; "
                               f"the previous checkpoints are kept")
    name = [None]
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".tmp-ckpt-*"):
            shutil.rmtree(stale, ignore_errors=True)
        name[0] = tempfile.mkdtemp(prefix=f".tmp-ckpt-{step:08d}-", dir=out)
    dist.broadcast_object_list(name, src=0)
    tmp = Path(name[0])
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "dcp"))
    dist.barrier()  # every shard is on disk
    final = out / f"ckpt-{step:08d}"
    if rank == 0:
        try:
            torch.save({"step": step, "optimizer": None, "scaler": None, "rng": rng_state(), "data": data_state},
                       tmp / "train_state.pt")
            meta = {"step": step, "format": "dcp", **(meta or {})}
            if hasattr(model, "cfg"):
                meta.setdefault("model_config", model.cfg.to_dict())
            with open(tmp / "meta.json", "w") as f:
                json.dump(meta, f, indent=2, default=str)
            for f in sorted(tmp.rglob("*")):
                _fsync(f)
            _fsync(tmp / "dcp")
            _fsync(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in list_checkpoints(out)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_sharded_state(ckpt, model, optimizer):
    """Restore a save_checkpoint_sharded checkpoint into an FSDP model and its optimizer, on any
    number of ranks (DCP reshards); returns the train state (step, data)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(Path(ckpt) / "dcp"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return load_train_state(ckpt, None, None)


def load_meta(ckpt) -> dict:
    with open(Path(ckpt) / "meta.json") as f:
        return json.load(f)


def load_weights(model, ckpt, strict: bool = True):
    """Weights of a checkpoint into a plain (unsharded) model: model.safetensors, or for a sharded
    (FSDP, "format": "dcp") checkpoint the model part of its DCP shards, read whole in this process."""
    ckpt = Path(ckpt)
    if (ckpt / "model.safetensors").exists():
        state = load_file(str(ckpt / "model.safetensors"))
    elif (ckpt / "dcp").is_dir():
        import torch.distributed.checkpoint as dcp

        state = {"model": {k: v.clone() for k, v in model.state_dict().items()}}
        dcp.load(state, checkpoint_id=str(ckpt / "dcp"), no_dist=True)
        state = state["model"]
    else:
        raise CheckpointError(f"{ckpt}: no model.safetensors and no dcp/ shards")
    model.load_state_dict(state, strict=strict)
    return model


def load_train_state(ckpt, optimizer=None, scaler=None, restore_rng: bool = True) -> dict:
    """Restore optimizer / scaler / RNG from train_state.pt; returns the state (step, data).
    The file is read with weights_only=True: one that needs pickle is refused (CheckpointError)."""
    path = Path(ckpt) / "train_state.pt"
    if not path.exists():
        raise CheckpointError(f"{path}: missing (a weights-only checkpoint cannot be resumed)")
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: refused: it holds objects other than tensors and plain types, which only "
                              f"pickle could load (and pickle can run code). Nothing from it was executed. "
                              f"({first[:200]})") from None
    if not isinstance(st, dict) or not {"step", "optimizer", "rng"} <= set(st):
        raise CheckpointError(f"{path}: not an llmcore training state (expected a dict with step/optimizer/rng)")
    if optimizer is not None:
        optimizer.load_state_dict(st["optimizer"])
    if scaler is not None and st.get("scaler") is not None:
        scaler.load_state_dict(st["scaler"])
    if restore_rng:
        set_rng_state(st["rng"])
    return st


def resolve_checkpoint(path) -> Path:
    """A checkpoint directory (meta.json) from itself or from a run directory (its latest checkpoint);
    FileNotFoundError saying what was looked for otherwise."""
    path = Path(path)
    if (path / "meta.json").exists():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        hint = " (a transformers directory: use llmcore.export.loading / --import)" if (path / "config.json").exists() \
            else ""
        raise FileNotFoundError(f"no checkpoint in {path}: neither a checkpoint (meta.json) nor a run directory "
                                f"with ckpt-* inside{hint}")
    return latest


def load_model(ckpt, device="cpu", backend=None, merge_adapters: bool = True) -> Transformer:
    """Build the model from a checkpoint directory (or an out dir: its latest checkpoint).

    A checkpoint of a LoRA / QLoRA run (meta "adapters") is rebuilt as written — base (NF4 for
    QLoRA) + adapters — and, with merge_adapters (default), folded into plain fp32 linears, so every
    tool gets an ordinary model; merge_adapters=False keeps the LoRA layers (to train on)."""
    ckpt = resolve_checkpoint(ckpt)
    meta = load_meta(ckpt)
    cfg = meta["model_config"]
    if backend is not None:
        cfg["backend"] = backend
    model = Transformer(ModelConfig.from_dict(cfg))
    if meta.get("adapters"):
        _with_adapters(model, meta["adapters"])
    load_weights(model, ckpt)
    if meta.get("adapters") and merge_adapters:
        from llmcore.nn.lora import merge_lora

        merge_lora(model)
    return model.to(device)
