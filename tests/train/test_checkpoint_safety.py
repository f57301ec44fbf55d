"""Checkpoints and the loop never run foreign code, never write bad weights over good ones, and never
silently change a resumed run: pickled payloads refused, NaN/inf steps skipped and counted, a
diverged run stopped with the step named, files fsync'd before the rename, log.jsonl valid JSON."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmcore.train import checkpoint
from llmcore.train.loop import ScheduleMismatch, TrainingDiverged, lm_loss, train
from tests.train.test_loop import tiny_model, toy_config, toy_data

ROOT = Path(__file__).resolve().parents[2]


class _Payload:
    """Unpickling this runs `touch <marker>` — what a crafted train_state.pt would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(ckpt_dir, marker):
    st = torch.load(ckpt_dir / "train_state.pt", weights_only=True)
    st["data"] = {"epoch": 0, "cursor": 0, "x": _Payload(marker)}
    torch.save(st, ckpt_dir / "train_state.pt")


def test_train_state_is_plain_and_loads_weights_only(tmp_path):
    train(tiny_model(), toy_data(), toy_config(tmp_path, max_steps=2))
    last = checkpoint.latest_checkpoint(tmp_path)
    st = torch.load(last / "train_state.pt", weights_only=True)  # raises if anything needs pickle
    assert {"step", "optimizer", "rng", "data"} <= set(st)


def test_resume_refuses_a_pickled_payload_and_runs_nothing(tmp_path):
    train(tiny_model(), toy_data(), toy_config(tmp_path / "run", max_steps=4, stop_at_step=2))
    marker = tmp_path / "PWNED"
    _plant(checkpoint.latest_checkpoint(tmp_path / "run"), marker)
    with pytest.raises(checkpoint.CheckpointError, match=r"train_state\.pt: refused"):
        train(tiny_model(), toy_data(), toy_config(tmp_path / "run", max_steps=4), resume=True)
    assert not marker.exists()


def test_pretrain_cli_resume_refuses_payload(tmp_path):
    """The path a user takes: `python scripts/pretrain.py --resume` on a planted checkpoint exits 1
    with a message naming the file, and the payload never runs."""
    from llmcore.data.tokenizer import train_tokenizer

    data = tmp_path / "pt.jsonl"
    data.write_text("".join(json.dumps({"text": f"document {i} says {i * 7} is seven times {i}."}) + "\n"
                            for i in range(200)), encoding="utf-8")
    train_tokenizer([data], 300, tmp_path / "tok")
    args = [sys.executable, str(ROOT / "scripts" / "pretrain.py"), "--data", str(data), "--tokenizer",
            str(tmp_path / "tok"), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--steps", "2",
            "--batch-size", "2", "--seq-len", "32", "--dtype", "fp32", "--no-progress", "--preset", "tiny",
            "--vocab-size", "320"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(args, check=True, env=env, capture_output=True, timeout=300)
    marker = tmp_path / "PWNED"
    _plant(checkpoint.latest_checkpoint(tmp_path / "out"), marker)
    r = subprocess.run(args + ["--resume", "--steps", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    assert "train_state.pt: refused" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists()


def _nan_after(step_from, step_to=10**9):
    """A loss that is NaN on the optimizer steps in [step_from, step_to) (counted by calls)."""
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss, m = lm_loss(model, batch)
        if step_from <= calls["n"] < step_to:
            loss = loss * float("nan")
        return loss, m
    return loss_fn


def _finite(ckpt):
    from safetensors.torch import load_file

    return not checkpoint.non_finite_tensors(load_file(str(ckpt / "model.safetensors")))


def test_non_finite_steps_are_skipped_counted_and_logged_as_null(tmp_path):
    model = tiny_model()
    hist = train(model, toy_data(), toy_config(tmp_path, max_steps=6, save_every=1, keep_last=10),
                 loss_fn=_nan_after(3, 5))
    assert hist["skipped_steps"] == 2 and hist["step"] == 6
    assert all(torch.isfinite(p).all() for p in model.parameters())
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"log.jsonl holds {c}"))
            for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in rows if "loss" in r}
    assert by_step[3]["loss"] is None and by_step[4]["loss"] is None and by_step[6]["skipped_steps"] == 2
    ckpts = checkpoint.list_checkpoints(tmp_path)
    assert [int(c.name[5:]) for c in ckpts] == [1, 2, 5, 6]  # no checkpoint on a skipped step
    assert all(_finite(c) for c in ckpts)


def test_diverged_run_stops_naming_the_step_and_keeps_good_checkpoints(tmp_path):
    model = tiny_model()
    with pytest.raises(TrainingDiverged, match=r"3 consecutive steps .* at step 5"):
        train(model, toy_data(), toy_config(tmp_path, max_steps=20, save_every=1, keep_last=2, max_bad_steps=3),
              loss_fn=_nan_after(3))
    ckpts = checkpoint.list_checkpoints(tmp_path)
    assert [c.name for c in ckpts] == ["ckpt-00000001", "ckpt-00000002"] and all(_finite(c) for c in ckpts)


def test_huge_lr_never_leaves_a_non_finite_checkpoint(tmp_path):
    """The reported case: --lr 1e3 in bf16. Whether the run ends or stops as diverged, every
    checkpoint on disk is finite and the newest finite one survives rotation."""
    model = tiny_model()
    cfg = toy_config(tmp_path, max_steps=12, save_every=1, keep_last=2, lr=1e3, warmup_steps=0, dtype="bf16",
                     grad_clip=0.0)
    try:
        train(model, toy_data(), cfg)
    except TrainingDiverged:
        pass
    ckpts = checkpoint.list_checkpoints(tmp_path)
    assert ckpts and all(_finite(c) for c in ckpts)


def test_save_checkpoint_refuses_non_finite_weights_and_keeps_old(tmp_path):
    model = tiny_model()
    checkpoint.save_checkpoint(tmp_path, 1, model, keep_last=1)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("inf")
    with pytest.raises(checkpoint.NonFiniteWeights, match="NaN/inf"):
        checkpoint.save_checkpoint(tmp_path, 2, model, keep_last=1)
    assert [c.name for c in checkpoint.list_checkpoints(tmp_path)] == ["ckpt-00000001"]
    assert not list(tmp_path.glob(".tmp-ckpt-*"))


def test_files_and_directories_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_rename = os.fsync, os.rename
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append(("rename", str(a))), real_rename(a, b))[1])
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters())
    checkpoint.save_checkpoint(tmp_path, 3, model, opt, data_state={"epoch": 0, "cursor": 0})
    rename = next(i for i, e in enumerate(events) if e[0] == "rename")
    tmp = events[rename][1]
    synced_before = {Path(p).name for kind, p in events[:rename] if kind == "fsync"}
    assert {"model.safetensors", "train_state.pt", "meta.json", Path(tmp).name} <= synced_before
    assert ("fsync", str(tmp_path)) in events[rename:]  # the parent, after the rename


def test_resume_with_a_changed_schedule_is_refused_unless_allowed(tmp_path, capsys):
    train(tiny_model(), toy_data(), toy_config(tmp_path, max_steps=6, stop_at_step=3))
    with pytest.raises(ScheduleMismatch, match=r"max_steps: 6 -> 12"):
        train(tiny_model(), toy_data(), toy_config(tmp_path, max_steps=12), resume=True)
    hist = train(tiny_model(), toy_data(), toy_config(tmp_path, max_steps=12, allow_schedule_change=True), resume=True)
    assert hist["step"] == 12
    assert "resuming on a changed schedule (max_steps: 6 -> 12)" in capsys.readouterr().err
    # the same schedule resumes without a word (stop_at_step is not part of the schedule)
    train(tiny_model(), toy_data(), toy_config(tmp_path / "b", max_steps=6, stop_at_step=3))
    train(tiny_model(), toy_data(), toy_config(tmp_path / "b", max_steps=6), resume=True)
