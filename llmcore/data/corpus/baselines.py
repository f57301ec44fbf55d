"""Baselines for the default corpus' held-out questions, computed from the same data.

The relation prior: answer every question with the most common answer of its relation (and
language) among the training facts (facts.jsonl, split "train": the facts SFT asks about), ignoring the
subject. A model that only learned the answer format and each relation's answer distribution scores
about this; knowledge of the subject is what beats it. Arithmetic items are a relation per operator
("+", "-"). Ties between equally common answers go to the alphabetically first one.
"""
from __future__ import annotations

from collections import Counter, defaultdict

from llmcore.data.corpus.scoring import score_answer


def question_relation(rec: dict) -> str:
    """The relation an eval record asks about: its "relation", or the operator of its "expr"."""
    if rec.get("relation"):
        return rec["relation"]
    if rec.get("expr"):
        return rec["expr"].split()[1]
    raise ValueError(f"eval record has neither 'relation' nor 'expr': {rec}")


def relation_prior(facts: list[dict]) -> dict[tuple[str, str], str]:
    """{(relation, lang): the most common answer among the training facts of that relation}."""
    counts = defaultdict(Counter)
    for f in facts:
        if f.get("split", "train") == "train":
            counts[(f["relation"], f["lang"])][f["answer"]] += 1
    return {k: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for k, c in counts.items()}


def split_accuracy(records: list[dict], oks: list[bool]) -> dict[str, float]:
    """{"all": accuracy, <split>: accuracy per split} of per-record outcomes `oks`."""
    if len(records) != len(oks):
        raise ValueError(f"records ({len(records)}) and oks ({len(oks)}) differ in length")
    by = defaultdict(list)
    for r, ok in zip(records, oks):
        by[r.get("split", "all")].append(bool(ok))
        by["all"].append(bool(ok))
    return {k: sum(v) / len(v) for k, v in sorted(by.items())}


def prior_accuracy(records: list[dict], facts: list[dict]) -> dict[str, float]:
    """Accuracy per split (and "all") of the relation-prior guess on eval records, scored by
    score_answer; a relation with no training fact is a miss."""
    prior = relation_prior(facts)
    oks = [score_answer(prior.get((question_relation(r), r["lang"]), ""), r["answer"]) for r in records]
    return split_accuracy(records, oks)


def format_split_table(records: list[dict], columns: list[tuple[str, dict]]) -> list[str]:
    """Lines of a per-split accuracy table, one column per (name, {split: accuracy})."""
    n = Counter(r.get("split", "all") for r in records)
    splits = sorted(n) + ["all"]
    n["all"] = len(records)
    lines = ["  " + f"{'split':<16}{'n':>4}" + "".join(f"{name:>18}" for name, _ in columns)]
    for sp in splits:
        lines.append("  " + f"{sp:<16}{n[sp]:>4}" + "".join(f"{acc.get(sp, float('nan')):>18.1%}" for _, acc in columns))
    return lines
