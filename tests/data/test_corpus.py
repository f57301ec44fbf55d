"""The default corpus: determinism, formats, held-out disjointness, facts present in pretraining."""
import hashlib
import json
import re

import pytest

from llmcore.data.corpus import (
    ADD_MAX_A, ARITH_STATE_EN, ARITH_STATE_ZH, RELATIONS, SUB_STATE_EN, SUB_STATE_ZH, generate_default_corpus,
    normalize_answer, score_answer, write_default_corpus,
)

NAMES = ("pretrain", "sft", "dpo", "reason", "eval", "eval_dpo", "eval_reason", "facts")


def _read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _digest(paths):
    return {k: hashlib.sha256(open(p, "rb").read()).hexdigest() for k, p in paths.items()}


def test_same_seed_same_bytes(tmp_path, tiny_corpus):
    again = write_default_corpus(tmp_path / "again", seed=0, size="tiny")
    assert sorted(again) == sorted(NAMES)
    assert _digest(again) == _digest(tiny_corpus)


def test_other_seed_other_world(tmp_path, tiny_corpus):
    other = write_default_corpus(tmp_path / "other", seed=1, size="tiny")
    d0, d1 = _digest(tiny_corpus), _digest(other)
    assert all(d0[k] != d1[k] for k in NAMES)


def test_micro_size_deterministic_and_held_out():
    a, b = generate_default_corpus(3, "micro"), generate_default_corpus(3, "micro")
    assert a == b
    train = {m["content"] for r in a["sft"] + a["reason"] for m in r["conversations"]}
    assert a["eval"] and not any(r["question"] in train for r in a["eval"])


def test_unknown_size():
    with pytest.raises(ValueError, match="size"):
        generate_default_corpus(0, "huge")


@pytest.fixture(scope="module")
def recs(tiny_corpus):
    return {k: _read(p) for k, p in tiny_corpus.items()}


def _messages_ok(msgs):
    assert isinstance(msgs, list) and msgs
    for m in msgs:
        assert set(m) == {"role", "content"}
        assert m["role"] in ("system", "user", "assistant")
        assert isinstance(m["content"], str) and m["content"]
    assert msgs[-1]["role"] == "assistant"


def test_formats(recs):
    assert all(set(r) == {"text"} and r["text"] for r in recs["pretrain"])
    for r in recs["sft"] + recs["reason"]:
        assert set(r) == {"conversations"}
        _messages_ok(r["conversations"])
    for r in recs["dpo"] + recs["eval_dpo"]:
        assert set(r) == {"chosen", "rejected"}
        _messages_ok(r["chosen"])
        _messages_ok(r["rejected"])
        assert r["chosen"][:-1] == r["rejected"][:-1], "a preference pair shares its prompt"
        assert r["chosen"][-1]["content"] != r["rejected"][-1]["content"]
    think = re.compile(r"^<think>[^<]+</think><answer>([^<]+)</answer>$")
    for r in recs["reason"]:
        for m in r["conversations"]:
            if m["role"] == "assistant":
                assert think.match(m["content"]), m["content"]
    for r in recs["eval"]:
        assert r["kind"] in ("fact", "arith") and r["lang"] in ("en", "zh")
        assert r["split"] in ("unseen_fact", "unseen_template")
        assert r["answer"] and len(r["answer"]) <= 12
    assert {r["kind"] for r in recs["eval"]} == {"fact", "arith"}
    assert {r["lang"] for r in recs["eval"]} == {"en", "zh"}
    assert all(r["answer"] and r["reasoning"] for r in recs["eval_reason"])


def test_bilingual(recs):
    cjk = sum(bool(re.search("[\u4e00-\u9fff]", r["text"])) for r in recs["pretrain"])
    assert 0.3 < cjk / len(recs["pretrain"]) < 0.7


def _train_texts(recs):
    texts = set()
    for r in recs["sft"] + recs["reason"]:
        texts.update(m["content"] for m in r["conversations"])
    for r in recs["dpo"]:
        texts.update(m["content"] for m in r["chosen"] + r["rejected"])
    return texts


def test_eval_questions_held_out(recs):
    train = _train_texts(recs)
    pretrain = "\n".join(r["text"] for r in recs["pretrain"])
    for r in recs["eval"] + recs["eval_reason"]:
        assert r["question"] not in train, r
        assert r["question"] not in pretrain, r
    for r in recs["eval_dpo"]:
        prompt = r["chosen"][-2]["content"]
        assert prompt not in {m["content"] for x in recs["dpo"] for m in x["chosen"]}


def test_eval_facts_are_in_pretraining(recs):
    pretrain = "\n".join(r["text"] for r in recs["pretrain"])
    for r in recs["eval"]:
        if r["kind"] == "fact":
            rel = RELATIONS[r["relation"]]
            tmpls = rel.state_en if r["lang"] == "en" else rel.state_zh
            stated = [t.format(s=r["subject"], v=r["answer"]) for t in tmpls]
        else:
            a, op, b = r["expr"].split()
            if op == "+":
                tmpls = ARITH_STATE_EN if r["lang"] == "en" else ARITH_STATE_ZH
            else:
                tmpls = SUB_STATE_EN if r["lang"] == "en" else SUB_STATE_ZH
            stated = [t.format(a=a, b=b, c=r["answer"]) for t in tmpls]
            assert int(r["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b))
            assert int(a) <= ADD_MAX_A
        assert sum(s in pretrain for s in stated) >= 1, r


def test_answers_are_right(recs):
    for r in recs["sft"]:
        msgs = r["conversations"]
        for q, a in zip(msgs, msgs[1:]):
            m = re.fullmatch(r"What is (\d+) \+ (\d+)\?", q["content"])
            if q["role"] == "user" and a["role"] == "assistant" and m:
                assert int(a["content"]) == int(m[1]) + int(m[2])
    for r in recs["reason"]:
        for m in r["conversations"]:
            for x, y, z in re.findall(r"(\d+) \+ (\d+) = (\d+)", m["content"]):
                assert int(x) + int(y) == int(z)


@pytest.mark.parametrize(
    "pred, answer, ok",
    [
        ("Velora", "Velora", True),
        ("velora.", "Velora", True),
        ("Velora is the capital.", "Velora", True),
        ("It is Velora.", "Velora", True),
        ("Veloran", "Velora", False),
        ("17", "7", False),
        ("7", "7", True),
        ("it is 7", "7", True),
        ("", "7", False),
        ("红色", "红色", True),
        ("它是红色的。", "红色", True),
        ("蓝色", "红色", False),
        ("<think>3 + 4 = 7</think><answer>7</answer>", "7", True),
        ("<think>the answer is 7</think><answer>8</answer>", "7", False),
        ("<think>so 7</think> 8", "7", False),
        ("8\n7", "7", False),
        ("ＡＢＣ", "abc", True),
        ("\n 7 \n8", "7", True),  # the first non-empty line
        # hedged or listed answers: only the first span counts, and a span holding a list is wrong
        ("1 2 3 4 5 6 7 8 9 10 11 12 13 14 15", "7", False),
        ("1 2 3 … 15", "7", False),
        ("7 8 9", "7", False),
        ("8, 7", "7", False),
        ("8 or 7", "7", False),
        ("8/7", "7", False),
        ("8; 7", "7", False),
        ("7, 8", "7", True),  # the first span is right
        ("Kasumi or Velora", "Velora", False),
        ("Kasumi, Velora, Doran", "Velora", False),
        ("Velora Kasumi Doran Pelo Mira", "Velora", False),
        ("Velora Velora", "Velora", False),
        ("蓝色、红色", "红色", False),
        ("蓝色或红色", "红色", False),
        ("蓝色，红色", "红色", False),
        ("红色、蓝色", "红色", True),
        ("红色红色", "红色", False),
        ("它可能是蓝色也可能是红色", "红色", False),
        ("It is 17 or 7.", "7", False),
        ("7 years old", "7", True),
        ("salt or pepper", "salt or pepper", True),  # a separator inside the answer does not cut
        ("<answer>8, 7</answer>", "7", False),
    ],
)
def test_score_answer(pred, answer, ok):
    assert score_answer(pred, answer) is ok


def test_normalize_answer():
    assert normalize_answer("  Hello,  World! ") == "hello world"
    assert normalize_answer("红色。") == "红色"


def test_facts_file_matches_the_splits(recs):
    """facts.jsonl says which facts SFT asks about: every unseen_fact eval question is about a fact of
    split unseen_fact, every unseen_template one about a training fact."""
    split = {(f["relation"], f["subject"], f["lang"]): f["split"] for f in recs["facts"]}
    for r in recs["eval"]:
        key = (r["relation"], r["subject"], r["lang"]) if r["kind"] == "fact" else (r["expr"].split()[1], r["expr"], r["lang"])
        assert split[key] == ("unseen_fact" if r["split"] == "unseen_fact" else "train"), r
    sft_answers = {(m["content"]) for r in recs["sft"] for m in r["conversations"] if m["role"] == "user"}
    assert any(f["split"] == "unseen_fact" for f in recs["facts"]) and sft_answers


def test_relation_prior():
    from llmcore.data.corpus import prior_accuracy, relation_prior

    facts = [{"relation": "color", "lang": "en", "answer": a, "split": s}
             for a, s in [("red", "train"), ("blue", "train"), ("blue", "train"), ("green", "unseen_fact"),
                          ("green", "unseen_fact"), ("green", "unseen_fact"), ("black", "train"), ("red", "train")]]
    facts += [{"relation": "+", "lang": "en", "answer": "7", "split": "train"}]
    assert relation_prior(facts) == {("color", "en"): "blue", ("+", "en"): "7"}  # tie blue/red: alphabetical
    evals = [{"relation": "color", "lang": "en", "answer": "blue", "split": "a"},
             {"relation": "color", "lang": "en", "answer": "green", "split": "a"},
             {"relation": "color", "lang": "zh", "answer": "蓝色", "split": "b"},  # no zh training fact: a miss
             {"expr": "3 + 4", "lang": "en", "answer": "7", "split": "b"}]
    assert prior_accuracy(evals, facts) == {"a": 0.5, "all": 0.5, "b": 0.5}


def test_prior_on_the_small_corpus_is_low_but_not_zero():
    from llmcore.data.corpus import prior_accuracy

    c = generate_default_corpus(0, "small")
    acc = prior_accuracy(c["eval"], c["facts"])
    assert 0.02 < acc["unseen_fact"] < 0.4 and 0.02 < acc["unseen_template"] < 0.4, acc
