"""Every stage CLI reads jsonl through the one reader: a bad line is one `error: file:line: what`
(exit 1, no traceback), --skip-bad is on every stage and reports what it skipped, an empty file is
named, and distill_reason evaluates on minimind's conversation format or on a held-out part of
--data — never on a bundled corpus written into the current directory unasked."""
import json
import runpy
import sys
from pathlib import Path

import pytest

from llmcore.train import stage_cli
from llmcore.train.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["pretrain.py", "sft.py", "lora.py", "dpo.py", "distill.py", "distill_reason.py", "eval.py",
          "prepare_data.py"]
COMMON = ["--steps", "2", "--batch-size", "2", "--dtype", "fp32", "--no-progress", "--max-len", "96"]


def _main(script):
    if str(ROOT / "scripts") not in sys.path:  # sft.py imports pretrain.py's argument helpers
        sys.path.insert(0, str(ROOT / "scripts"))
    return runpy.run_path(str(ROOT / "scripts" / script))["main"]


def _run(script, argv):
    """main(argv) as `python scripts/<script>` runs it (stage_cli.run_cli): returns its value, or
    the SystemExit message."""
    try:
        return stage_cli.run_cli(lambda: _main(script)(argv))
    except SystemExit as e:
        return e


@pytest.mark.parametrize("script", STAGES)
def test_every_stage_has_skip_bad(script, capsys):
    with pytest.raises(SystemExit):
        _main(script)(["--help"])
    assert "--skip-bad" in capsys.readouterr().out


@pytest.fixture(scope="module")
def files(bundled, sft_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_data")
    save_checkpoint(d / "sft", 0, sft_model[0], meta={"tokenizer": str(bundled["work"] / "tokenizer")})
    out = {}
    for k in ("sft", "dpo", "reason"):
        lines = Path(bundled["corpus"][k]).read_text(encoding="utf-8").splitlines()[:30]
        out[k] = d / f"{k}.jsonl"
        out[k].write_text("\n".join(lines[:5] + ['{"conversations": [{"role": "user"'] + lines[5:]) + "\n",
                          encoding="utf-8")
    return d, out


CASES = [("lora.py", "sft", []), ("dpo.py", "dpo", []), ("distill.py", "sft", ["--student-dim", "64",
         "--student-layers", "1"]), ("distill_reason.py", "reason", ["--eval-n", "2"])]


@pytest.mark.parametrize("script,kind,extra", CASES)
def test_bad_line_is_one_error_naming_file_and_line_and_skip_bad_skips_it(files, tmp_path, capsys, script,
                                                                          kind, extra):
    d, data = files
    init = ["--teacher"] if script == "distill.py" else ["--init"]
    argv = [*init, str(d / "sft"), "--out", str(tmp_path / "o"), "--data", str(data[kind]), *COMMON, *extra]
    r = _run(script, argv)
    assert isinstance(r, SystemExit) and str(r.code).startswith(f"error: {data[kind]}:6: invalid JSON"), r
    capsys.readouterr()
    r = _run(script, argv + ["--skip-bad"])
    assert not isinstance(r, SystemExit), r
    assert f"skipped 1 malformed line(s) in {data[kind]}" in capsys.readouterr().err


def test_empty_file_is_named(files, tmp_path):
    d, _ = files
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = _run("lora.py", ["--init", str(d / "sft"), "--out", str(tmp_path / "o"), "--data", str(empty), *COMMON])
    assert isinstance(r, SystemExit) and r.code == f"error: {empty}: empty file"


def test_distill_reason_eval_data_in_conversation_format_and_no_corpus_in_cwd(files, bundled, tmp_path,
                                                                               monkeypatch, capsys):
    d, data = files
    monkeypatch.chdir(tmp_path)
    conv = [json.dumps({"conversations": [{"role": "user", "content": r["question"]},
                                          {"role": "assistant", "content": f"<think>{r['reasoning']}</think>"
                                                                           f"<answer>{r['answer']}</answer>"}]})
            for r in map(json.loads, Path(bundled["corpus"]["eval_reason"]).read_text().splitlines()[:3])]
    ev = tmp_path / "ev.jsonl"
    ev.write_text("\n".join(conv) + "\n")
    r = _main("distill_reason.py")(["--init", str(d / "sft"), "--out", str(tmp_path / "r1"), "--data",
                                    str(data["reason"]), "--skip-bad", "--eval-data", str(ev), "--eval-n", "3",
                                    *COMMON])
    assert json.loads((tmp_path / "r1" / "format_rate.json").read_text())["n"] == 3
    assert f"on {ev}" in capsys.readouterr().out
    r = _main("distill_reason.py")(["--init", str(d / "sft"), "--out", str(tmp_path / "r2"), "--data",
                                    str(data["reason"]), "--skip-bad", "--eval-n", "2", *COMMON])
    out = capsys.readouterr().out
    assert f"no --eval-data: the format rate and answer accuracy on the last 2 of the 30 records of {data['reason']}" \
        in out
    assert not (tmp_path / "out").exists()  # nothing written into the current directory unasked
