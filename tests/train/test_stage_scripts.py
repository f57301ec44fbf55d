"""Every post-training script runs end to end (a few steps each) from the shared SFT model."""
import json
import runpy
import sys
from pathlib import Path

import pytest

from llmcore.train.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def _main(script):
    return runpy.run_path(str(ROOT / "scripts" / script))["main"]


@pytest.fixture(scope="module")
def ckpt(bundled, sft_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("scripts")
    save_checkpoint(d / "sft", 0, sft_model[0], meta={"tokenizer": str(bundled["work"] / "tokenizer")})
    small = {}
    for k in ("sft", "dpo", "reason", "eval_dpo", "eval_reason"):
        lines = Path(bundled["corpus"][k]).read_text(encoding="utf-8").splitlines()[:24]
        small[k] = d / f"{k}.jsonl"
        small[k].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d, small


COMMON = ["--steps", "2", "--batch-size", "4", "--dtype", "fp32", "--no-progress", "--max-len", "96"]


def test_lora_and_qlora_scripts(ckpt, tmp_path):
    d, small = ckpt
    _main("lora.py")(["--init", str(d / "sft"), "--out", str(tmp_path / "lora"), "--data", str(small["sft"]),
                      "--merge", "--targets", "wq,wv", *COMMON])
    cfg = json.loads((tmp_path / "lora" / "adapter" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    assert list((tmp_path / "lora" / "merged").glob("ckpt-*"))
    _main("lora.py")(["--init", str(d / "sft"), "--out", str(tmp_path / "qlora"), "--data", str(small["sft"]),
                      "--qlora", "--steps", "2", "--batch-size", "4", "--dtype", "bf16", "--no-progress",
                      "--max-len", "96"])
    assert (tmp_path / "qlora" / "adapter" / "adapter_model.safetensors").exists()


def test_dpo_distill_reason_scripts(ckpt, tmp_path):
    d, small = ckpt
    # DPO does what it is for: the mean log-prob margin (chosen - rejected) of the pairs it trains
    # on rises (measured with these settings: see the test's assertion message on failure)
    r = _main("dpo.py")(["--init", str(d / "sft"), "--out", str(tmp_path / "dpo"), "--data", str(small["dpo"]),
                         "--eval-data", str(small["dpo"]), *COMMON, "--steps", "6", "--lr", "1e-3"])
    assert r["after"][1] > r["before"][1] + 0.05, (r["before"], r["after"])
    assert r["history"]["losses"][-1][1] < r["history"]["losses"][0][1], r["history"]["losses"]
    r = _main("dpo.py")(["--init", str(d / "sft"), "--out", str(tmp_path / "dpo_lora"), "--data", str(small["dpo"]),
                         "--eval-data", str(small["eval_dpo"]), "--lora", *COMMON])
    assert (tmp_path / "dpo_lora" / "adapter" / "adapter_config.json").exists()
    h = _main("distill.py")(["--teacher", str(d / "sft"), "--out", str(tmp_path / "kd"), "--data", str(small["sft"]),
                             "--eval-data", str(small["sft"]), "--student-dim", "64", "--student-layers", "1", *COMMON])
    assert h["step"] == 2
    r = _main("distill_reason.py")(["--init", str(d / "sft"), "--out", str(tmp_path / "reason"),
                                    "--data", str(small["reason"]), "--eval-data", str(small["eval_reason"]),
                                    "--eval-n", "2", *COMMON])
    assert json.loads((tmp_path / "reason" / "format_rate.json").read_text())["n"] == 2
