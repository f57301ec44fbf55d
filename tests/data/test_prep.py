"""jsonl -> shards: exact documents, exact loss masks, malformed-line reporting, DPO shards."""
import json

import numpy as np
import pytest

from llmcore.data.prep import (
    BadLine, encode_conversation, prepare_dpo, prepare_pretrain, prepare_sft, read_meta, token_dtype,
)


def _write_jsonl(path, records, raw_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return path


def _load(shard, with_mask=True):
    meta = read_meta(shard)
    tokens = np.fromfile(shard / "tokens.bin", dtype=meta["dtype"])
    mask = np.fromfile(shard / "mask.bin", dtype=np.uint8) if with_mask else None
    docs = np.load(shard / "docs.npy")
    return meta, tokens, mask, docs


def _runs(ids, mask):
    """Maximal runs of consecutive tokens with mask 1."""
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(int(i))
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


def test_prepare_pretrain_documents(tok, tmp_path):
    texts = ["The capital of Kalomi is Vosuri.", "卡洛米的首都是沃苏里。", "1 + 2 = 3", "x"]
    src = _write_jsonl(tmp_path / "pt.jsonl", [{"text": t} for t in texts], raw_lines=["", "   "])
    st = prepare_pretrain([src], tok, tmp_path / "pt", num_workers=1, progress=False)
    meta, tokens, _, docs = _load(tmp_path / "pt", with_mask=False)
    assert not (tmp_path / "pt" / "mask.bin").exists()
    assert meta["dtype"] == "uint16" == np.dtype(token_dtype(tok.vocab_size)).name
    assert meta["num_docs"] == st["num_docs"] == 4 and meta["num_bad"] == 0
    assert meta["tokenizer_hash"] == tok.hash and meta["vocab_size"] == tok.vocab_size
    assert docs[0] == 0 and docs[-1] == len(tokens) == meta["num_tokens"]
    for d, t in enumerate(texts):
        assert tokens[docs[d]:docs[d + 1]].tolist() == [tok.bos_id] + tok.encode(t) + [tok.eos_id]


def test_token_dtype():
    assert token_dtype(6400) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32 and token_dtype(151936) == np.uint32


CONVS = [
    [{"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "7"}],
    [{"role": "system", "content": "你是一个乐于助人的助手。"}, {"role": "user", "content": "洛文住在哪里？"},
     {"role": "assistant", "content": "鲁帕哈"}, {"role": "user", "content": "计算11加9。"},
     {"role": "assistant", "content": "20"}],
    [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "<think>1 + 1 = 2</think><answer>2</answer>"}],
    [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": ""}],
    [{"role": "assistant", "content": "Hello! How can I help you?"}, {"role": "user", "content": "Bye"},
     {"role": "assistant", "content": " Goodbye.\n"}],
    # characters outside the BMP before and inside the loss span (offsets are code points)
    [{"role": "user", "content": "emoji 🙂🙂 龘?"}, {"role": "assistant", "content": "🙂 fine 龘"},
     {"role": "user", "content": "\n\n"}, {"role": "assistant", "content": "\n\nok"}],
]


@pytest.mark.parametrize("conv", CONVS)
def test_loss_mask_exact(tok, conv):
    ids, mask = encode_conversation(tok, conv)
    assert ids.tolist() == tok.apply_chat_template(conv)
    expected = [tok.encode(m["content"]) + [tok.im_end_id] for m in conv if m["role"] == "assistant"]
    assert _runs(ids, mask) == expected
    # and nothing else: every masked token is inside one of those runs
    assert int(mask.sum()) == sum(len(r) for r in expected)
    _, last = encode_conversation(tok, conv, only_last=True)
    assert _runs(ids, last) == expected[-1:]


def test_loss_mask_by_hand(tok):
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ids, mask = encode_conversation(tok, conv)
    hdr_user = [tok.im_start_id] + tok.encode("user\nHi") + [tok.im_end_id] + tok.encode("\n")
    hdr_asst = [tok.im_start_id] + tok.encode("assistant\n")
    body = tok.encode("Hello") + [tok.im_end_id]
    tail = tok.encode("\n")
    assert ids.tolist() == hdr_user + hdr_asst + body + tail
    assert mask.tolist() == [0] * (len(hdr_user) + len(hdr_asst)) + [1] * len(body) + [0] * len(tail)


def test_prepare_sft_matches_encode(tok, tmp_path):
    src = _write_jsonl(tmp_path / "sft.jsonl", [{"conversations": c, "extra": 1} for c in CONVS])
    st = prepare_sft([src], tok, tmp_path / "sft", num_workers=1, progress=False)
    meta, tokens, mask, docs = _load(tmp_path / "sft")
    assert meta["kind"] == "sft" and meta["num_docs"] == len(CONVS) and len(mask) == len(tokens)
    assert st["num_loss_tokens"] == int(mask.sum())
    for d, conv in enumerate(CONVS):
        ids, m = encode_conversation(tok, conv)
        assert tokens[docs[d]:docs[d + 1]].tolist() == ids.tolist()
        assert mask[docs[d]:docs[d + 1]].tolist() == m.tolist()


def test_workers_give_identical_shards(tok, tiny_corpus, tmp_path, monkeypatch):
    import llmcore.data.prep as prep

    monkeypatch.setattr(prep, "CHUNK_LINES", 37)  # many chunks, and a pool even for small files
    monkeypatch.setattr(prep, "MIN_BYTES_FOR_POOL", 0)
    one = prepare_sft([tiny_corpus["sft"], tiny_corpus["reason"]], tok, tmp_path / "one", num_workers=1, progress=False)
    two = prepare_sft([tiny_corpus["sft"], tiny_corpus["reason"]], tok, tmp_path / "two", num_workers=2, progress=False)
    assert one["num_tokens"] == two["num_tokens"] > 0
    for name in ("tokens.bin", "mask.bin", "docs.npy"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


BAD_SFT_LINES = [
    ("{not json", "invalid JSON"),
    (json.dumps({"messages": []}), "missing key 'conversations'"),
    (json.dumps({"conversations": []}), "empty conversation"),
    (json.dumps({"conversations": [{"role": "robot", "content": "hi"}]}), "role 'robot'"),
    (json.dumps({"conversations": [{"role": "user", "content": "hi"}]}), "no assistant message"),
    (json.dumps({"conversations": [{"role": "user"}]}), "missing 'role' or 'content'"),
    (json.dumps({"conversations": [{"role": "assistant", "content": 3}]}), "content must be a string"),
    (json.dumps([1, 2]), "expected a JSON object"),
]


@pytest.mark.parametrize("line, reason", BAD_SFT_LINES)
def test_malformed_sft_line_strict(tok, tmp_path, line, reason):
    good = {"conversations": CONVS[0]}
    src = _write_jsonl(tmp_path / "bad.jsonl", [good, good], raw_lines=[line, json.dumps(good)])
    with pytest.raises(ValueError) as e:
        prepare_sft([src], tok, tmp_path / "out", num_workers=1, progress=False)
    assert isinstance(e.value, BadLine)
    assert f"{src}:3: " in str(e.value) and reason in str(e.value)
    assert not (tmp_path / "out" / "meta.json").exists()


def test_skip_bad_counts(tok, tmp_path):
    good = {"conversations": CONVS[1]}
    lines = [line for line, _ in BAD_SFT_LINES]
    src = _write_jsonl(tmp_path / "bad.jsonl", [good], raw_lines=lines + [json.dumps(good)])
    st = prepare_sft([src], tok, tmp_path / "out", num_workers=1, strict=False, progress=False)
    assert st["num_bad"] == len(BAD_SFT_LINES) and st["num_docs"] == 2
    assert st["bad_examples"][0].startswith(f"{src}:2: ")
    assert read_meta(tmp_path / "out")["num_bad"] == len(BAD_SFT_LINES)


@pytest.mark.parametrize(
    "line, reason",
    [('{"text": ""}', "empty 'text'"), ('{"txt": "a"}', "missing key 'text'"), ('{"text": 5}', "must be a string")],
)
def test_malformed_pretrain_line(tok, tmp_path, line, reason):
    src = _write_jsonl(tmp_path / "pt.jsonl", [{"text": "ok"}], raw_lines=[line])
    with pytest.raises(ValueError, match=f"pt.jsonl:2: .*{reason}"):
        prepare_pretrain(src, tok, tmp_path / "out", num_workers=1, progress=False)
    st = prepare_pretrain(src, tok, tmp_path / "out", num_workers=1, strict=False, progress=False)
    assert st["num_bad"] == 1 and st["num_docs"] == 1


def test_cli_skip_bad(tok_dir, tmp_path, capsys):
    from scripts.prepare_data import main

    src = _write_jsonl(tmp_path / "pt.jsonl", [{"text": "ok"}], raw_lines=["{oops"])
    with pytest.raises(SystemExit):
        main(["--kind", "pretrain", "--data", str(src), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "o"),
              "--num-workers", "1", "--no-progress"])
    assert f"{src}:2: invalid JSON" in capsys.readouterr().err
    main(["--kind", "pretrain", "--data", str(src), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "o"),
          "--num-workers", "1", "--no-progress", "--skip-bad"])
    assert "1 malformed line(s) skipped" in capsys.readouterr().out


def test_prepare_dpo(tok, tmp_path):
    prompt = [{"role": "user", "content": "What is 3 + 4?"}]
    pairs = [
        {"chosen": prompt + [{"role": "assistant", "content": "7"}], "rejected": prompt + [{"role": "assistant", "content": "8"}]},
        {"chosen": CONVS[1], "rejected": CONVS[1][:-1] + [{"role": "assistant", "content": "21"}]},
    ]
    src = _write_jsonl(tmp_path / "dpo.jsonl", pairs,
                       raw_lines=[json.dumps({"chosen": prompt + [{"role": "assistant", "content": "7"}],
                                               "rejected": prompt + [{"role": "assistant", "content": "8"}] + prompt})])
    with pytest.raises(ValueError, match="dpo.jsonl:3: .*'rejected' must end with an assistant message"):
        prepare_dpo([src], tok, tmp_path / "dpo", num_workers=1, progress=False)
    st = prepare_dpo([src], tok, tmp_path / "dpo", num_workers=1, strict=False, progress=False)
    assert st["num_pairs"] == 2 and st["num_bad"] == 1
    for side in ("chosen", "rejected"):
        meta, tokens, mask, docs = _load(tmp_path / "dpo" / side)
        assert meta["num_docs"] == 2
        for d, pair in enumerate(pairs):
            conv = pair[side]
            assert tokens[docs[d]:docs[d + 1]].tolist() == tok.apply_chat_template(conv)
            # only the completion (last assistant message) and its <|im_end|> carry loss
            assert _runs(tokens[docs[d]:docs[d + 1]], mask[docs[d]:docs[d + 1]]) == [tok.encode(conv[-1]["content"]) + [tok.eos_id]]


def test_missing_input(tok, tmp_path):
    with pytest.raises(FileNotFoundError):
        prepare_pretrain([tmp_path / "nope.jsonl"], tok, tmp_path / "o", progress=False)


def test_prepare_default_data_and_reuse(tmp_path):
    from llmcore.data.datasets import DPODataset, PackedPretrainDataset, SFTDataset
    from llmcore.data.prep import prepare_default_data

    r = prepare_default_data(tmp_path, size="tiny", num_workers=1, progress=False)
    assert set(r["corpus"]) == {"pretrain", "sft", "dpo", "reason", "eval", "eval_dpo", "eval_reason", "facts"}
    assert len(PackedPretrainDataset(r["pretrain"], 64)) > 0
    assert len(SFTDataset(r["sft"], 64)) == 200 and len(SFTDataset(r["reason"], 64)) > 0
    assert len(DPODataset(r["dpo"], 64)) == 50 and len(DPODataset(r["eval_dpo"], 64)) == 10
    for k in ("pretrain", "sft", "reason", "dpo"):
        assert read_meta(r[k])["tokenizer_hash"] == r["tokenizer"].hash
    mtime = (r["pretrain"] / "tokens.bin").stat().st_mtime_ns
    again = prepare_default_data(tmp_path, size="tiny", num_workers=1, progress=False)
    assert again["seconds"] == {} and again["tokenizer"].hash == r["tokenizer"].hash
    assert (r["pretrain"] / "tokens.bin").stat().st_mtime_ns == mtime


def test_train_tokenizer_cli(tiny_corpus, tmp_path, capsys):
    from llmcore.data.tokenizer import Tokenizer
    from scripts.train_tokenizer import main

    main(["--data", str(tiny_corpus["sft"]), "--vocab-size", "500", "--out", str(tmp_path / "t")])
    t = Tokenizer.load(tmp_path / "t")
    assert t.vocab_size <= 500 and t.token_to_id("<|im_end|>") == 2
    assert "trained" in capsys.readouterr().out
