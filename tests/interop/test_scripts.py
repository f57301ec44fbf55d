"""The CLIs, run in-process: export_hf (export with --check, then --import) and plan."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tests.interop.conftest import tiny_model

ROOT = Path(__file__).resolve().parents[2]


def _script(name):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_export_and_import_cli(tok_dir, tok, tmp_path, capsys):
    pytest.importorskip("transformers")
    from llmcore.export.loading import load_model_and_tokenizer
    from llmcore.train.checkpoint import save_checkpoint

    model = tiny_model(tok.vocab_size, seed=11)
    save_checkpoint(tmp_path / "run", 2, model, meta={"tokenizer_dir": str(tok_dir)})
    cli = _script("export_hf")
    cli.main([str(tmp_path / "run"), str(tmp_path / "hf"), "--check"])
    out = capsys.readouterr().out
    diff = float(out.split("vs transformers ")[1].split()[0])
    assert diff < 2e-5 and (tmp_path / "hf" / "tokenizer.json").exists()
    ck = cli.main(["--import", str(tmp_path / "hf"), str(tmp_path / "back")])
    back, btok = load_model_and_tokenizer(ck)
    assert btok is not None and btok.encode("hello 世界") == tok.encode("hello 世界")
    ids = torch.randint(3, tok.vocab_size, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model(ids), rtol=0, atol=0)


def test_plan_cli(capsys, tmp_path):
    cli = _script("plan")
    p = cli.main(["minimind-26m", "--tokens", "2e9", "--gpu", "A100", "--mfu", "0.5", "--zero", "2", "--gpus", "4"])
    out = capsys.readouterr().out
    assert "25,829,888" in out and "A100" in out and p["params"]["total"] == 25_829_888
    assert p["memory"][2]["optimizer"] == p["memory"][0]["optimizer"] // 4
    cli.main(["minimind-moe", "--json"])
    j = json.loads(capsys.readouterr().out)
    assert j["params"]["active"] < j["params"]["total"]
    p = cli.main(["tiny", "--dim", "128", "--n-layers", "3"])
    assert p["arch"]["dim"] == 128 and p["arch"]["n_layers"] == 3
