"""Every checkpoint a stage writes is loadable by every tool: LoRA / QLoRA loop checkpoints
(<out>/ckpt-*) load as base + adapter merged in load_model, chat.py, export_hf.py and eval.py; chat.py
also takes a `lora.py --merge` output and a transformers export directory."""
import runpy
from pathlib import Path

import pytest
import torch

from llmcore.train import checkpoint
from llmcore.train.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["--steps", "3", "--batch-size", "4", "--dtype", "fp32", "--no-progress", "--max-len", "64", "--lr", "5e-2"]


def _main(script):
    return runpy.run_path(str(ROOT / "scripts" / script))["main"]


@pytest.fixture(scope="module")
def runs(bundled, sft_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("loadable")
    save_checkpoint(d / "sft", 0, sft_model[0], meta={"tokenizer": str(bundled["work"] / "tokenizer")})
    sft = Path(bundled["corpus"]["sft"])
    small = d / "sft.jsonl"
    small.write_text("\n".join(sft.read_text(encoding="utf-8").splitlines()[:40]) + "\n", encoding="utf-8")
    _main("lora.py")(["--init", str(d / "sft"), "--out", str(d / "lora"), "--data", str(small), "--merge", *COMMON])
    _main("lora.py")(["--init", str(d / "sft"), "--out", str(d / "qlora"), "--data", str(small), "--qlora", *COMMON])
    return d


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids).float()


def test_lora_loop_checkpoint_loads_merged_and_equals_the_merged_output(runs):
    ids = torch.randint(7, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    loop = checkpoint.load_model(runs / "lora")  # <out>/ckpt-00000003, base + adapters
    merged = checkpoint.load_model(runs / "lora" / "merged")
    base = checkpoint.load_model(runs / "sft")
    assert not any("lora" in k for k in loop.state_dict())
    torch.testing.assert_close(_logits(loop, ids), _logits(merged, ids), atol=1e-5, rtol=1e-5)
    assert (_logits(loop, ids) - _logits(base, ids)).abs().max() > 1e-3  # the adapter is in there
    unmerged = checkpoint.load_model(runs / "lora", merge_adapters=False)
    assert any("lora_A" in k for k in unmerged.state_dict())
    torch.testing.assert_close(_logits(unmerged, ids), _logits(loop, ids), atol=1e-4, rtol=1e-4)


def test_qlora_loop_checkpoint_loads_as_dequantized_base_plus_adapter(runs):
    ids = torch.randint(7, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    loop = checkpoint.load_model(runs / "qlora")
    unmerged = checkpoint.load_model(runs / "qlora", merge_adapters=False)  # NF4 base + LoRA, as trained
    assert any(k.endswith("weight_data") for k in unmerged.state_dict())
    ref = _logits(unmerged, ids)
    err = (_logits(loop, ids) - ref).abs().max().item()
    assert err <= 0.05 * ref.abs().max().item(), err  # bf16 compute of the NF4 layers vs the fp32 merge


@pytest.mark.parametrize("run", ["lora", "qlora", "lora/merged"])
def test_chat_export_and_eval_take_every_stage_output(runs, tmp_path, run, capsys):
    src = runs / run
    _main("chat.py")(["--ckpt", str(src), "--prompt", "hello", "--max-new-tokens", "3", "--temperature", "0"])
    out = _main("export_hf.py")([str(src), str(tmp_path / "hf")])
    assert (Path(out) / "config.json").exists()
    r = _main("eval.py")([str(src), "--ppl", str(runs / "sft.jsonl"), "--limit", "4"])
    assert all(v["ppl"] > 1 for v in r.values())
    _main("chat.py")(["--ckpt", str(tmp_path / "hf"), "--prompt", "hello", "--max-new-tokens", "3",
                      "--temperature", "0"])
    assert "error" not in capsys.readouterr().err.lower()
