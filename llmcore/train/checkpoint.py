"""Checkpoints: a directory per step, written atomically, the last N kept.

    <out>/ckpt-00001000/
        model.safetensors   weights (state_dict; the tied lm_head is embed.weight, stored once)
        train_state.pt      optimizer, grad scaler, RNG states (python, numpy, torch, cuda),
                            data position, step — everything --resume needs to continue exactly
        meta.json           model config, step, tokens seen, anything the stage adds

The directory is written as <out>/.tmp-ckpt-*, then renamed into place (os.rename is atomic on one
filesystem): a crash during a save leaves the previous checkpoints untouched, and a half-written
temporary directory is never taken for a checkpoint (and is removed by the next save).
"""
import json
import os
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


def rng_state() -> dict:
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


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
    """Write <out_dir>/ckpt-<step> atomically and delete all but the newest keep_last."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".tmp-ckpt-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-ckpt-{step:08d}-", dir=out))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        if optimizer is not None:
            torch.save({"step": step, "optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict() if scaler is not None else None,
                        "rng": rng_state(), "data": data_state}, tmp / "train_state.pt")
        meta = {"step": step, **(meta or {})}
        if hasattr(model, "cfg"):
            meta.setdefault("model_config", model.cfg.to_dict())
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=2, default=str)
        final = out / f"ckpt-{step:08d}"
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(out)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_meta(ckpt) -> dict:
    with open(Path(ckpt) / "meta.json") as f:
        return json.load(f)


def load_weights(model, ckpt, strict: bool = True):
    state = load_file(str(Path(ckpt) / "model.safetensors"))
    model.load_state_dict(state, strict=strict)
    return model


def load_train_state(ckpt, optimizer=None, scaler=None, restore_rng: bool = True) -> dict:
    """Restore optimizer / scaler / RNG from train_state.pt; returns the state (step, data)."""
    st = torch.load(Path(ckpt) / "train_state.pt", map_location="cpu", weights_only=False)
    if optimizer is not None:
        optimizer.load_state_dict(st["optimizer"])
    if scaler is not None and st.get("scaler") is not None:
        scaler.load_state_dict(st["scaler"])
    if restore_rng:
        set_rng_state(st["rng"])
    return st


def load_model(ckpt, device="cpu", backend=None) -> Transformer:
    """Build the model from a checkpoint directory (or an out dir: its latest checkpoint)."""
    ckpt = Path(ckpt)
    if not (ckpt / "meta.json").exists():
        latest = latest_checkpoint(ckpt)
        if latest is None:
            raise FileNotFoundError(f"no checkpoint in {ckpt}")
        ckpt = latest
    cfg = load_meta(ckpt)["model_config"]
    if backend is not None:
        cfg["backend"] = backend
    model = Transformer(ModelConfig.from_dict(cfg))
    load_weights(model, ckpt)
    return model.to(device)
