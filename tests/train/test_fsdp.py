"""FSDP2 (--fsdp) on CPU over gloo: the same losses as the single-process run of the same global
batch; sharded Distributed Checkpoint checkpoints saved on 2 ranks resume on 1 and on 3 with the
same next losses and no item read twice in the epoch; LoRA under FSDP; a rank dying mid-save leaves
the previous checkpoint loadable; a sharded checkpoint loads (and exports) without any process group."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmcore.train import checkpoint
from llmcore.train.loop import train
from tests.train.test_loop import tiny_model, toy_config
from tests.train.test_loss_normalization import UnevenLabels

ROOT = Path(__file__).resolve().parents[2]
STEPS, STOP = 6, 3
_PORT = [29600]


def torchrun(n, out, *args, check=True):
    _PORT[0] += 1
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
                        str(_PORT[0]), "-m", "tests.train._fsdp_worker", str(out), *map(str, args)],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check and r.returncode:
        raise AssertionError(r.stderr[-3000:])
    return r


def losses(path):
    return dict((s, l) for s, l in json.loads(Path(path).read_text()))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp")
    torchrun(2, d / "full", "train", STEPS)                 # uninterrupted, 2 ranks
    torchrun(2, d / "part", "train", STEPS, STOP)           # stops (and saves) after step 3
    for n in (1, 3):
        shutil.copytree(d / "part" / "run", d / f"resume{n}" / "run")
        torchrun(n, d / f"resume{n}", "train", STEPS)
    return d


def test_fsdp_losses_equal_single_process(runs, tmp_path):
    full = losses(runs / "full" / f"losses_2_1.json")
    single = train(tiny_model(), UnevenLabels(n=48), toy_config(tmp_path, max_steps=STEPS, batch_size=6, lr=1e-2))
    for s, l in single["losses"]:
        assert abs(full[s] - l) <= 1e-5 * abs(l), (s, full[s], l)


@pytest.mark.parametrize("n", [1, 3])
def test_resume_on_another_number_of_ranks(runs, n):
    full = losses(runs / "full" / "losses_2_1.json")
    resumed = losses(runs / f"resume{n}" / f"losses_{n}_{STOP + 1}.json")
    assert sorted(resumed) == list(range(STOP + 1, STEPS + 1))
    for s, l in resumed.items():
        assert abs(full[s] - l) <= 1e-5 * abs(l), (n, s, full[s], l)
    seen = []
    for f in list((runs / "part").glob("seen_2_*_1.json")) + list((runs / f"resume{n}").glob(f"seen_{n}_*_{STOP + 1}.json")):
        seen += json.loads(f.read_text())
    assert len(seen) == 6 * STEPS and len(set(seen)) == len(seen)  # one epoch (48 items): nothing read twice


def test_sharded_checkpoint_loads_without_a_process_group_and_exports(runs, tmp_path):
    from llmcore.export.hf import export_hf

    last = checkpoint.latest_checkpoint(runs / "full" / "run")
    assert (last / "dcp").is_dir() and checkpoint.load_meta(last)["format"] == "dcp"
    model = checkpoint.load_model(runs / "full" / "run")
    ids = torch.randint(3, 256, (1, 16))
    assert torch.isfinite(model(ids)).all()
    assert (export_hf(model, tmp_path / "hf") / "config.json").exists()


def test_lora_under_fsdp(tmp_path):
    torchrun(2, tmp_path, "lora", 3)
    got = losses(tmp_path / "losses_2_1.json")
    assert len(got) == 3 and all(torch.isfinite(torch.tensor(v)) for v in got.values())


def test_a_rank_dying_mid_save_leaves_the_previous_checkpoint(tmp_path):
    r = torchrun(2, tmp_path, "crash", 4, check=False)
    assert r.returncode != 0
    assert [c.name for c in checkpoint.list_checkpoints(tmp_path / "run")] == ["ckpt-00000001"]
    assert torch.isfinite(checkpoint.load_model(tmp_path / "run")(torch.randint(3, 256, (1, 8)))).all()
