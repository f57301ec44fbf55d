"""Multiple-choice accuracy on C-Eval / CMMLU-format csv files, by option log-likelihoods.

File format (header row, UTF-8, comma separated): a question column (`question` / `Question`), four
option columns `A`, `B`, `C`, `D`, and the answer letter (`answer` / `Answer`); other columns (id,
explanation, ...) are ignored. A directory is read as one subject per csv file (name = file stem).

Scoring, for each question, the model reads the prompt

    {question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案：           (mode "letter")
    {question}\\n答案：                                              (modes "text", "text_norm")

and the prediction is the argmax over options of
    letter     log p(letter | prompt)                 (the log-prob of the option letter's first token)
    text       sum_t log p(option_t | prompt, option_<t)        (log-likelihood of the option text)
    text_norm  the same divided by the number of option tokens  (length-normalized)
Prompt and continuation are tokenized separately and concatenated (so the continuation's tokens are
the same for every prompt). `chat=True` wraps the prompt in the ChatML template (user turn +
assistant generation prompt) for SFT models. Log-probabilities are fp32 log_softmax.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Sequence

import torch

LETTERS = ("A", "B", "C", "D")
MODES = ("letter", "text", "text_norm")


def _col(row: dict, *names):
    for n in names:
        for k in row:
            if k is not None and k.strip().lower() == n.lower():
                return row[k]
    return None


def read_csv(path: str | Path) -> list[dict]:
    """Questions of one C-Eval / CMMLU csv: [{question, options [4], answer index}]."""
    out = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        for n, row in enumerate(csv.DictReader(f), 2):
            q = _col(row, "question")
            opts = [_col(row, L) for L in LETTERS]
            ans = (_col(row, "answer") or "").strip().upper()
            if q is None or any(o is None for o in opts) or ans not in LETTERS:
                raise ValueError(f"{path}:{n}: need question, A-D and an answer letter A-D, got {dict(row)}")
            out.append({"question": q.strip(), "options": [o.strip() for o in opts], "answer": LETTERS.index(ans)})
    return out


def read_subjects(path: str | Path) -> dict[str, list[dict]]:
    path = Path(path)
    files = sorted(path.glob("*.csv")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no csv files in {path}")
    return {p.stem: read_csv(p) for p in files}


def build_prompt(item: dict, mode: str) -> str:
    if mode == "letter":
        opts = "".join(f"\n{L}. {o}" for L, o in zip(LETTERS, item["options"]))
        return f"{item['question']}{opts}\n答案："
    return f"{item['question']}\n答案："


@torch.no_grad()
def continuation_logprobs(model, prompt_ids: Sequence[int], conts: Sequence[Sequence[int]], device="cpu") -> list[list[float]]:
    """Per-token log p of each continuation given the prompt (one batched forward, right-padded)."""
    seqs = [list(prompt_ids) + list(c) for c in conts]
    L = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
    logits = model(ids.to(device))
    if isinstance(logits, tuple):
        logits = logits[0]
    logp = torch.log_softmax(logits.float(), dim=-1)
    out = []
    P = len(prompt_ids)
    for i, c in enumerate(conts):
        pos = torch.arange(P - 1, P - 1 + len(c))  # logits at t predict token t + 1
        tgt = torch.tensor(list(c), dtype=torch.long)
        out.append(logp[i, pos, tgt].tolist())
    return out


def score_item(model, tokenizer, item: dict, mode: str = "letter", chat: bool = False, device="cpu") -> list[float]:
    """The four option scores (higher = more likely) of one question."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    prompt = build_prompt(item, mode)
    if chat:
        p_ids = list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True))
    else:
        p_ids = [tokenizer.bos_id] + list(tokenizer.encode(prompt))
    if mode == "letter":
        conts = [tokenizer.encode(L)[:1] for L in LETTERS]
    else:
        conts = [tokenizer.encode(o) or [tokenizer.eos_id] for o in item["options"]]
    lps = continuation_logprobs(model, p_ids, conts, device)
    if mode == "text_norm":
        return [sum(lp) / len(lp) for lp in lps]
    return [sum(lp) for lp in lps]


def evaluate(model, tokenizer, subjects: dict[str, list[dict]], mode: str = "letter", chat: bool = False,
             device="cpu") -> dict:
    """{"subjects": {name: {"correct", "total", "accuracy"}}, "overall": {...}, "mode", "chance": 0.25}."""
    was = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    res = {}
    try:
        for name, items in subjects.items():
            correct = 0
            for it in items:
                scores = score_item(model, tokenizer, it, mode, chat, device)
                pred = max(range(4), key=lambda j: (scores[j], -j))  # ties -> the earlier letter
                correct += int(pred == it["answer"])
            res[name] = {"correct": correct, "total": len(items),
                         "accuracy": correct / len(items) if items else math.nan}
    finally:
        if was and hasattr(model, "train"):
            model.train()
    c = sum(r["correct"] for r in res.values())
    t = sum(r["total"] for r in res.values())
    return {"subjects": res, "overall": {"correct": c, "total": t, "accuracy": c / t if t else math.nan},
            "mode": mode, "chance": 0.25}


def format_table(results: dict) -> str:
    rows = [("subject", "correct", "total", "accuracy")]
    for name, r in results["subjects"].items():
        rows.append((name, str(r["correct"]), str(r["total"]), f"{r['accuracy']:.3f}"))
    o = results["overall"]
    rows.append(("overall", str(o["correct"]), str(o["total"]), f"{o['accuracy']:.3f}"))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"| {' | '.join(r[i].ljust(w[i]) for i in range(4))} |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (x + 2) for x in w) + "|")
    return "\n".join(lines) + f"\n(mode {results['mode']}, chance {results['chance']:.2f})"
