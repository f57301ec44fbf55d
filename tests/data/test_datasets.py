"""Datasets over shards: windows tile the stream, positions restart at documents, labels/masks,
packing, DPO items, cu_seqlens, resumable order."""
import itertools
import json
import pickle

import numpy as np
import pytest
import torch

from llmcore.data.datasets import (
    IGNORE_INDEX, DPODataset, PackedPretrainDataset, ResumableBatchSampler, SFTDataset, collate,
    cu_seqlens_from_positions, epoch_order,
)
from llmcore.data.prep import encode_conversation, prepare_dpo, prepare_pretrain, prepare_sft


def _write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="module")
def pt_shard(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("pt")
    texts = ["a" * k + " end." for k in (1, 9, 3, 30, 2, 17, 5, 1, 40, 8)] + ["卡洛米的首都是沃苏里。"]
    prepare_pretrain(_write_jsonl(d / "pt.jsonl", [{"text": t} for t in texts]), tok, d / "shard", num_workers=1, progress=False)
    return d / "shard"


def _stream(shard):
    meta = json.loads((shard / "meta.json").read_text())
    return np.fromfile(shard / "tokens.bin", dtype=meta["dtype"]).astype(np.int64), np.load(shard / "docs.npy")


@pytest.mark.parametrize("seq_len", [1, 5, 16, 64])
def test_pretrain_windows(pt_shard, seq_len):
    tokens, docs = _stream(pt_shard)
    ds = PackedPretrainDataset(pt_shard, seq_len)
    assert len(ds) == (len(tokens) - 1) // seq_len
    starts = set(docs[:-1].tolist())
    for i in range(len(ds)):
        it = ds[i]
        assert all(v.dtype == torch.long and v.shape == (seq_len,) for v in it.values())
        t0 = i * seq_len
        assert it["input_ids"].tolist() == tokens[t0:t0 + seq_len].tolist()
        for j in range(seq_len):
            t = t0 + j
            doc = max(k for k in range(len(docs) - 1) if docs[k] <= t)
            assert it["positions"][j] == t - docs[doc]  # restarts at every document start
            want = IGNORE_INDEX if (t + 1) in starts else tokens[t + 1]
            assert it["labels"][j] == want
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_pretrain_windows_tile_stream(pt_shard):
    tokens, _ = _stream(pt_shard)
    ds = PackedPretrainDataset(pt_shard, 7)
    cat = torch.cat([ds[i]["input_ids"] for i in range(len(ds))])
    assert cat.tolist() == tokens[:len(ds) * 7].tolist()


def test_pretrain_default_corpus_docs_short(tok, tiny_corpus, tmp_path):
    st = prepare_pretrain([tiny_corpus["pretrain"]], tok, tmp_path / "pt", num_workers=1, progress=False)
    assert st["max_doc_len"] < 256
    ds = PackedPretrainDataset(tmp_path / "pt", 128)
    pos = torch.stack([ds[i]["positions"] for i in range(len(ds))])
    assert (pos == 0).sum() >= st["num_docs"] - len(ds)  # every document start is seen


@pytest.fixture(scope="module")
def convs():
    return [
        [{"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "7"}],
        [{"role": "system", "content": "你是一个乐于助人的助手。"}, {"role": "user", "content": "洛文住在哪里？"},
         {"role": "assistant", "content": "鲁帕哈"}, {"role": "user", "content": "计算11加9。"},
         {"role": "assistant", "content": "20"}],
        [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "<think>1 + 1 = 2</think><answer>2</answer>"}],
    ]


@pytest.fixture(scope="module")
def sft_shard(tok, convs, tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    prepare_sft(_write_jsonl(d / "sft.jsonl", [{"conversations": c} for c in convs]), tok, d / "shard", num_workers=1, progress=False)
    return d / "shard"


@pytest.mark.parametrize("seq_len", [8, 64])
def test_sft_items(tok, convs, sft_shard, seq_len):
    ds = SFTDataset(sft_shard, seq_len)
    assert len(ds) == len(convs)
    for i, conv in enumerate(convs):
        ids, mask = encode_conversation(tok, conv)
        ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
        n = len(ids) - 1
        it = ds[i]
        assert it["input_ids"][:n].tolist() == ids[:-1].tolist()
        assert (it["input_ids"][n:] == tok.pad_id).all()
        want = [int(t) if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])] + [IGNORE_INDEX] * (seq_len - n)
        assert it["labels"].tolist() == want
        assert it["attention_mask"].tolist() == [1] * n + [0] * (seq_len - n)
        assert it["positions"].tolist() == list(range(n)) + list(range(seq_len - n))


def test_sft_labels_are_assistant_text(tok, convs, sft_shard):
    it = SFTDataset(sft_shard, 128)[1]
    learned = tok.decode([t for t in it["labels"].tolist() if t != IGNORE_INDEX])
    assert learned == "鲁帕哈<|im_end|>20<|im_end|>"


def test_sft_packing(tok, convs, sft_shard):
    single = SFTDataset(sft_shard, 256)
    packed = SFTDataset(sft_shard, 256, pack=True)
    assert len(packed) == 1  # three short conversations fit in one row
    it = packed[0]
    lens = [len(tok.apply_chat_template(c)) for c in convs]
    total = sum(lens)
    starts = np.cumsum([0] + lens[:-1]).tolist()
    assert [j for j in range(256) if it["positions"][j] == 0][:3] == starts
    learned = [t for t in it["labels"].tolist() if t != IGNORE_INDEX]
    assert learned == [t for i in range(len(convs)) for t in single[i]["labels"].tolist() if t != IGNORE_INDEX]
    assert it["attention_mask"].sum() == total - 1
    small = SFTDataset(sft_shard, max(lens) - 1, pack=True)
    assert len(small) == len(convs)  # nothing fits together: one per row


def test_dpo_items(tok, tmp_path):
    prompt = [{"role": "user", "content": "What is 3 + 4?"}]
    pairs = [{"chosen": prompt + [{"role": "assistant", "content": "7"}],
              "rejected": prompt + [{"role": "assistant", "content": "8"}]}] * 2
    prepare_dpo(_write_jsonl(tmp_path / "d.jsonl", pairs), tok, tmp_path / "dpo", num_workers=1, progress=False)
    ds = DPODataset(tmp_path / "dpo", 32)
    assert len(ds) == 2
    it = ds[0]
    assert set(it) == {f"{s}_{k}" for s in ("chosen", "rejected") for k in ("input_ids", "labels", "positions", "attention_mask")}
    for side, ans in (("chosen", "7"), ("rejected", "8")):
        assert [t for t in it[f"{side}_labels"].tolist() if t != IGNORE_INDEX] == tok.encode(ans) + [tok.eos_id]
    b = collate([ds[0], ds[1]])
    assert b["chosen_input_ids"].shape == (2, 32)


def test_collate(pt_shard):
    ds = PackedPretrainDataset(pt_shard, 8)
    b = collate([ds[0], ds[1], ds[2]])
    assert set(b) == {"input_ids", "labels", "positions"} and b["input_ids"].shape == (3, 8)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate)
    assert next(iter(loader))["labels"].shape == (2, 8)


def test_cu_seqlens_hand_cases():
    pos = torch.tensor([[0, 1, 2, 0, 1], [3, 4, 0, 1, 2]])
    cu, mx = cu_seqlens_from_positions(pos)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 7, 10] and mx == 3
    cu, mx = cu_seqlens_from_positions(torch.arange(4).repeat(2, 1))
    assert cu.tolist() == [0, 4, 8] and mx == 4
    cu, mx = cu_seqlens_from_positions(torch.zeros(1, 3, dtype=torch.long))
    assert cu.tolist() == [0, 1, 2, 3] and mx == 1
    cu, mx = cu_seqlens_from_positions(torch.tensor([[5, 6, 7]]))  # a row starting mid-document
    assert cu.tolist() == [0, 3] and mx == 3
    with pytest.raises(ValueError):
        cu_seqlens_from_positions(torch.zeros(3, dtype=torch.long))


def test_cu_seqlens_from_dataset(pt_shard):
    ds = PackedPretrainDataset(pt_shard, 16)
    b = collate([ds[i] for i in range(len(ds))])
    cu, mx = cu_seqlens_from_positions(b["positions"])
    flat = b["positions"].reshape(-1)
    for a, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        seg = flat[a:e]
        assert (seg - seg[0] == torch.arange(e - a)).all()  # consecutive positions inside a doc
    assert mx == max(e - a for a, e in zip(cu[:-1].tolist(), cu[1:].tolist())) <= 16


def test_epoch_order_pure():
    a = epoch_order(100, seed=3, epoch=2)
    assert sorted(a.tolist()) == list(range(100))
    assert (a == epoch_order(100, seed=3, epoch=2)).all()
    assert not (a == epoch_order(100, seed=3, epoch=1)).all()
    assert not (a == epoch_order(100, seed=4, epoch=2)).all()
    assert epoch_order(5, 0, 0, shuffle=False).tolist() == [0, 1, 2, 3, 4]


def test_sampler_resume():
    full = list(itertools.islice(iter(ResumableBatchSampler(10, 3, seed=7)), 9))  # crosses epochs
    assert all(len(b) == 3 for b in full)
    assert sorted(sum(full[:3], [])) == sorted(set(sum(full[:3], [])))  # no repeat inside an epoch
    resumed = list(itertools.islice(iter(ResumableBatchSampler(10, 3, seed=7, start_batch=4)), 5))
    assert resumed == full[4:]
    s = ResumableBatchSampler(10, 3, seed=7)
    s.set_position(6)
    assert next(iter(s)) == full[6] == s.batch(6)
    assert len(ResumableBatchSampler(10, 3, seed=7, epochs=2)) == 6
    assert len(list(ResumableBatchSampler(10, 3, seed=7, epochs=2, start_batch=1))) == 5
    assert len(list(ResumableBatchSampler(10, 3, drop_last=False, epochs=1))) == 4
    with pytest.raises(TypeError):
        len(ResumableBatchSampler(10, 3))


def test_pickle_does_not_copy_data(pt_shard):
    ds = PackedPretrainDataset(pt_shard, 8)
    ds[0]  # open the maps
    blob = pickle.dumps(ds)
    assert len(blob) < 4096
    back = pickle.loads(blob)
    assert back[1]["input_ids"].tolist() == ds[1]["input_ids"].tolist()
