"""The one jsonl reader (llmcore.data.jsonl) and prep on top of it: every malformed line is reported
as `file:line: what`, BOM / non-UTF-8 / empty files are handled the same everywhere, --skip-bad
counts, pretrain text that carries its own <|im_start|>/<|im_end|> gets no second bos/eos, and the
prepared-shard cache is keyed on content + tokenizer + settings."""
import json

import numpy as np
import pytest

from llmcore.data import jsonl
from llmcore.data.jsonl import BadLine, NoData, read_jsonl
from llmcore.data.prep import prepare_cached, prepare_pretrain, prepare_sft, read_meta
from llmcore.eval.perplexity import read_texts
from llmcore.train.sft import read_eval

CONV = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
PAIR = {"chosen": CONV["conversations"], "rejected": [CONV["conversations"][0], {"role": "assistant", "content": "no"}]}
GOOD = {"pretrain": {"text": "some text"}, "sft": CONV, "dpo": PAIR, "eval": {"question": "q?", "answer": "a"}}

# (kind, line, what the message must say)
MALFORMED = [
    ("pretrain", '{"text": "unterminated', "invalid JSON: Unterminated string"),
    ("pretrain", '[1, 2]', "expected a JSON object, got list"),
    ("pretrain", '{"txt": "x"}', "missing key 'text'"),
    ("pretrain", '{"text": 5}', "'text' must be a string, got int"),
    ("pretrain", '{"text": "  "}', "empty 'text'"),
    ("sft", '{"conversations": "hi"}', "'conversations' must be a list"),
    ("sft", '{"conversations": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ("sft", '{"conversations": [{"role": "bot", "content": "hi"}]}', "has role 'bot'"),
    ("sft", '{"conversations": [{"role": "assistant", "content": ["x"]}]}', "content must be a string, got list"),
    ("dpo", json.dumps({"chosen": CONV["conversations"]}), "missing key 'rejected'"),
    ("dpo", json.dumps({"chosen": CONV["conversations"], "rejected": CONV["conversations"][:1]}),
     "'rejected' has no assistant message"),
    ("eval", '{"question": "q"}', "missing key 'answer'"),
    ("eval", json.dumps({"conversations": [{"role": "assistant", "content": "a"}]}), "no user turn"),
]


def _write(path, lines, bom=False):
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)
    return path


@pytest.mark.parametrize("kind,line,what", MALFORMED)
def test_malformed_line_names_file_line_and_reason(tmp_path, kind, line, what):
    p = _write(tmp_path / "d.jsonl", [json.dumps(GOOD[kind]), "", line])
    with pytest.raises(BadLine) as e:
        read_jsonl(p, kind)
    assert str(e.value).startswith(f"{p}:3: ") and what in str(e.value)
    assert "at at" not in str(e.value)
    st = {}
    assert len(read_jsonl(p, kind, skip_bad=True, stats=st)) == 1 and st["num_bad"] == 1


def test_bom_non_utf8_empty_and_no_usable_line(tmp_path, capsys):
    p = _write(tmp_path / "bom.jsonl", [json.dumps({"text": "héllo"})], bom=True)
    assert read_jsonl(p, "pretrain") == ["héllo"]
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(json.dumps({"text": "ok"}).encode() + b"\n" + '{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(BadLine, match=rf"{bad}:2: not valid UTF-8 \(byte 0xe9 at column 14\)"):
        read_jsonl(bad, "pretrain")
    assert read_jsonl(bad, "pretrain", skip_bad=True) == ["ok"]
    assert f"skipped 1 malformed line(s) in {bad}" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(NoData, match=rf"{empty}: empty file"):
        read_jsonl(empty, "sft")
    allbad = _write(tmp_path / "allbad.jsonl", ['{"x": 1}', "not json"])
    with pytest.raises(NoData, match=rf"{allbad}: no usable line \(2 non-blank line\(s\), 2 malformed"):
        read_jsonl(allbad, "pretrain", skip_bad=True)
    with pytest.raises(FileNotFoundError, match="no such jsonl file"):
        read_jsonl(tmp_path / "missing.jsonl", "sft")


def test_eval_reads_question_answer_and_minimind_conversations(tmp_path):
    conv = {"conversations": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+3?"},
                              {"role": "assistant", "content": "<think>2+3=5</think><answer>5</answer>"}]}
    p = _write(tmp_path / "ev.jsonl", [json.dumps({"question": "q", "answer": "a", "split": "x"}), json.dumps(conv)])
    recs = read_eval(p)
    assert recs[0] == {"question": "q", "answer": "a", "split": "x"}
    assert recs[1]["question"] == "2+3?" and recs[1]["answer"] == "5" and recs[1]["system"] == "be brief"


def test_perplexity_reader_uses_the_same_rules(tmp_path):
    p = _write(tmp_path / "t.jsonl", [json.dumps({"text": "a"}), '{"text": '], bom=True)
    with pytest.raises(BadLine, match=rf"{p}:2: invalid JSON"):
        read_texts(p)
    assert read_texts(p, skip_bad=True) == ["a"]


def test_prep_same_rules_bom_utf8_empty(tok, tmp_path):
    p = _write(tmp_path / "sft.jsonl", [json.dumps(CONV)], bom=True)
    assert prepare_sft([p], tok, tmp_path / "s", num_workers=1, progress=False)["num_docs"] == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(json.dumps(CONV).encode() + b"\n\xff\xfe\n")
    with pytest.raises(BadLine, match=rf"{bad}:2: not valid UTF-8"):
        prepare_sft([bad], tok, tmp_path / "b", num_workers=1, progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(NoData, match=rf"{empty}: empty file"):
        prepare_pretrain([empty], tok, tmp_path / "e", num_workers=1, progress=False)
    allbad = _write(tmp_path / "allbad.jsonl", ['{"x": 1}'])
    with pytest.raises(NoData, match=rf"{allbad}: no usable line"):
        prepare_pretrain([allbad], tok, tmp_path / "a", num_workers=1, strict=False, progress=False)


def test_pretrain_text_with_its_own_chatml_markers_gets_one_bos_and_eos(tok, tmp_path):
    texts = ["<|im_start|>The capital of Kalomi is Vosuri.<|im_end|>", "plain text", "<|im_start|>open only"]
    p = _write(tmp_path / "pt.jsonl", [json.dumps({"text": t}) for t in texts])
    prepare_pretrain([p], tok, tmp_path / "pt", num_workers=1, progress=False)
    meta = read_meta(tmp_path / "pt")
    tokens = np.fromfile(tmp_path / "pt" / "tokens.bin", dtype=meta["dtype"]).tolist()
    docs = np.load(tmp_path / "pt" / "docs.npy").tolist()
    b, e = tok.bos_id, tok.eos_id
    for d in range(3):
        doc = tokens[docs[d]:docs[d + 1]]
        assert doc[0] == b and doc[1] != b and doc[-1] == e and doc[-2] != e, (texts[d], doc[:3], doc[-3:])
    assert tokens[docs[0]:docs[1]] == tok.encode(texts[0])


def test_prepared_shard_cache_is_keyed_on_content_tokenizer_and_settings(tok, tmp_path, capsys):
    from llmcore.data.tokenizer import train_tokenizer

    src = _write(tmp_path / "pt.jsonl", [json.dumps({"text": f"doc {i}"}) for i in range(5)])
    out = tmp_path / "shard"
    assert prepare_cached("pretrain", [src], tok, out, progress=False)["reused"] is False
    assert prepare_cached("pretrain", [src], tok, out, progress=False)["reused"] is True
    with open(src, "a") as f:  # lines appended: same name, new content
        f.write(json.dumps({"text": "one more"}) + "\n")
    r = prepare_cached("pretrain", [src], tok, out, progress=False)
    assert r["reused"] is False and read_meta(out)["num_docs"] == 6
    assert f"re-preparing {out}: input pt.jsonl changed" in capsys.readouterr().err
    other = tmp_path / "elsewhere"
    other.mkdir()
    same_name = _write(other / "pt.jsonl", [json.dumps({"text": "different"})])  # another file, same name
    assert prepare_cached("pretrain", [same_name], tok, out, progress=False)["reused"] is False
    assert read_meta(out)["num_docs"] == 1
    tok2 = train_tokenizer([src], 300, tmp_path / "tok2")
    assert prepare_cached("pretrain", [same_name], tok2, out, progress=False)["reused"] is False
    assert "the tokenizer changed" in capsys.readouterr().err
    assert prepare_cached("pretrain", [same_name], tok2, out, strict=False, progress=False)["reused"] is False


def test_every_kind_is_known():
    for kind in jsonl.KINDS:
        if kind in GOOD:
            assert jsonl.parse_record(kind, json.dumps(GOOD[kind]))
