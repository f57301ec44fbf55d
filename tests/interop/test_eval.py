"""Eval math on hand-built cases: a model whose next-token distribution is a known table, so
perplexity and option log-likelihoods can be computed by hand."""
import math
import subprocess
import sys

import pytest
import torch

from llmcore.eval import SAMPLE_CSV
from llmcore.eval.choice import evaluate, format_table, read_csv, read_subjects, score_item
from llmcore.eval.perplexity import perplexity, read_texts, token_nll

V = 8


class Bigram(torch.nn.Module):
    """logits[t] = table[ids[t]]: p(next | current) = softmax(table[current])."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, ids):
        return self.table[ids]


class CharTok:
    """'a'..'e' -> 3..7; bos 1, eos 2."""
    bos_id, eos_id = 1, 2

    def encode(self, s):
        return [ord(c) - ord("a") + 3 for c in s if "a" <= c <= "e"]

    def apply_chat_template(self, msgs, add_generation_prompt=True):
        return [1] + self.encode(msgs[0]["content"]) + [2, 1]


def _table(seed=0):
    return torch.randn(V, V, generator=torch.Generator().manual_seed(seed))


def hand_nll(table, ids):
    lp = torch.log_softmax(table.double(), -1)
    return sum(-lp[a, b].item() for a, b in zip(ids[:-1], ids[1:]))


def test_perplexity_by_hand():
    table = _table()
    model = Bigram(table)
    texts = ["abcab", "eed", "c"]
    tok = CharTok()
    r = perplexity(model, texts, tok, max_len=64)
    total, n = 0.0, 0
    for t in texts:
        ids = [1] + tok.encode(t) + [2]
        total += hand_nll(table, ids)
        n += len(ids) - 1
    assert r["tokens"] == n == 6 + 4 + 2 and r["documents"] == 3
    assert r["nll"] == pytest.approx(total / n, rel=1e-6)
    assert r["ppl"] == pytest.approx(math.exp(total / n), rel=1e-6)


@pytest.mark.parametrize("max_len,stride", [(2, None), (3, None), (4, 2), (5, 1), (64, 8)])
def test_windows_score_every_token_once(max_len, stride):
    """A bigram model needs only one token of context, so any windowing gives the exact total."""
    table = _table(1)
    ids = [1, 3, 4, 5, 6, 7, 3, 3, 4, 2, 5, 6]
    s, n = token_nll(Bigram(table), ids, max_len, stride)
    assert n == len(ids) - 1
    assert s == pytest.approx(hand_nll(table, ids), rel=1e-6)


def test_window_context_matters():
    """A model that sees the whole window: with stride < max_len, later windows carry context."""
    class Count(torch.nn.Module):  # logit of token 3 = number of tokens seen so far in the window
        def forward(self, ids):
            S = ids.shape[1]
            out = torch.zeros(1, S, V)
            out[0, :, 3] = torch.arange(1, S + 1, dtype=torch.float32)
            return out

    ids = [1] + [3] * 9
    s, n = token_nll(Count(), ids, max_len=4, stride=2)
    # window [0,4) scores targets 1..3 having seen 1..3 tokens; then [2,6), [4,8), [6,10) each
    # re-read 2 tokens and score their last two targets having seen 2 and 3 tokens
    def nll(c):
        return -(c - math.log(math.exp(c) + V - 1))
    expect = nll(1) + nll(2) + nll(3) + 3 * (nll(2) + nll(3))
    assert n == 9 and s == pytest.approx(expect, rel=1e-6)


def test_choice_by_hand(tmp_path):
    table = _table(2)
    model = Bigram(table)
    tok = CharTok()
    csv = tmp_path / "subj.csv"
    csv.write_text("id,question,A,B,C,D,answer\n0,ab,c,dd,e,a,B\n1,ca,a,b,c,d,A\n", encoding="utf-8")
    items = read_csv(csv)
    lp = torch.log_softmax(table.double(), -1)
    for mode in ("text", "text_norm"):
        for it in items:
            scores = score_item(model, tok, it, mode=mode)
            # prompt "{q}\n答案：" -> chars a-e only; the last prompt token is the question's last char
            last = tok.encode(it["question"])[-1]
            for j, opt in enumerate(it["options"]):
                ids = [last] + tok.encode(opt)
                s = sum(lp[a, b].item() for a, b in zip(ids[:-1], ids[1:]))
                if mode == "text_norm":
                    s /= len(ids) - 1
                assert scores[j] == pytest.approx(s, rel=1e-5, abs=1e-6)
    # letter mode: letters A-D map to ids 3..6 and are scored after the prompt's last token
    it = items[0]

    class LetterTok(CharTok):
        def encode(self, s):
            return [ord(c.lower()) - ord("a") + 3 for c in s if "a" <= c.lower() <= "e"]
    t2 = LetterTok()
    scores = score_item(model, t2, it, mode="letter")
    last = t2.encode("ab\nA. c\nB. dd\nC. e\nD. a\n答案：")[-1]
    assert scores == pytest.approx([lp[last, 3 + j].item() for j in range(4)], rel=1e-5)
    res = evaluate(model, t2, {"subj": items}, mode="text")
    preds_ok = 0
    for it in items:
        s = score_item(model, t2, it, mode="text")
        preds_ok += int(max(range(4), key=lambda j: (s[j], -j)) == it["answer"])
    assert res["overall"]["correct"] == preds_ok and res["overall"]["total"] == 2
    assert "overall" in format_table(res)


def test_sample_csv_and_errors(tmp_path):
    subj = read_subjects(SAMPLE_CSV)
    items = subj["sample_ceval"]
    assert len(items) >= 10 and all(len(i["options"]) == 4 for i in items)
    assert {i["answer"] for i in items} == {0, 1, 2, 3}
    cm = tmp_path / "cmmlu.csv"  # CMMLU layout: unnamed index column, capitalized headers
    cm.write_text(",Question,A,B,C,D,Answer\n0,q?,1,2,3,4,D\n", encoding="utf-8")
    assert read_csv(cm) == [{"question": "q?", "options": ["1", "2", "3", "4"], "answer": 3}]
    bad = tmp_path / "bad.csv"
    bad.write_text("question,A,B,C,D,answer\nq,1,2,3,4,E\n", encoding="utf-8")
    with pytest.raises(ValueError, match="answer"):
        read_csv(bad)
    j = tmp_path / "t.jsonl"
    j.write_text('{"text": "x"}\n\n{"conversations": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    assert read_texts(j) == ["x", "a\nb"]
    j.write_text('{"question": "q?", "answer": "b", "kind": "fact"}\n')
    assert read_texts(j) == ["q?\nb"]
    j.write_text('{"oops": 1}\n')
    with pytest.raises(ValueError, match="text"):
        read_texts(j)


def test_eval_script_end_to_end(tok_dir, tok, corpus, tmp_path):
    """scripts/eval.py on a saved checkpoint: perplexity equals the library call, table printed."""
    from llmcore.train.checkpoint import save_checkpoint
    from tests.interop.conftest import tiny_model

    model = tiny_model(tok.vocab_size, seed=5)
    ck = save_checkpoint(tmp_path / "run", 1, model, meta={"tokenizer_dir": str(tok_dir)})
    texts = read_texts(corpus["pretrain"])[:5]
    want = perplexity(model, texts, tok, max_len=model.cfg.max_seq_len)
    out = subprocess.run([sys.executable, "scripts/eval.py", str(ck), "--ppl", str(corpus["pretrain"]), "--limit", "5",
                          "--choice", "--json", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=180,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[2]))
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    got = json.loads((tmp_path / "r.json").read_text())
    assert got[f"ppl:{corpus['pretrain']}"]["ppl"] == pytest.approx(want["ppl"], rel=1e-5)
    assert got["choice"]["overall"]["total"] == min(5, len(read_csv(SAMPLE_CSV)))  # --limit 5
    assert "| overall" in out.stdout
