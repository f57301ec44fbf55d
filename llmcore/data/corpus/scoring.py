"""The exact-match rule for the default corpus' eval files: `score_answer`, `first_answer_span`,
`normalize_answer`."""
from __future__ import annotations

import re
import unicodedata

# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------

_ANSWER_TAG = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.S)
_THINK = re.compile(r"<think>.*?(?:</think>|$)", re.S)
_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)


def normalize_answer(s: str) -> str:
    """NFKC, lower case, punctuation (ASCII and CJK) -> space, whitespace collapsed."""
    s = unicodedata.normalize("NFKC", s).lower()
    s = _PUNCT.sub(" ", s)
    return " ".join(s.split())


def _is_cjk(s: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in s)


# Separators that end the first answer span: a second value after one of them is a hedge or a list,
# and only the first value counts. One that occurs in the expected answer itself does not cut.
ANSWER_SEPARATORS = (",", ";", "/", "|", "、", "，", "；", "／", " or ", " OR ", "或")
MAX_EXTRA_WORDS = 3  # words around an English answer ("It is Velora.", "Velora is the capital.")
MAX_EXTRA_CHARS = 4  # characters around a Chinese answer ("它是红色的。")


def first_answer_span(prediction: str, answer: str = "") -> str:
    """The part of a model reply that `score_answer` judges: the inside of `<answer>…</answer>` when
    present (else the reply with `<think>…</think>` dropped), its first non-empty line, cut at the
    first ANSWER_SEPARATORS entry that does not occur in `answer`."""
    m = _ANSWER_TAG.search(prediction)
    text = m.group(1) if m else _THINK.sub(" ", prediction)
    text = text.strip().split("\n", 1)[0] if text.strip() else ""
    cut = len(text)
    for sep in ANSWER_SEPARATORS:
        if sep in answer:
            continue
        i = text.find(sep)
        if 0 <= i < cut:
            cut = i
    return text[:cut].strip()


def _has_digit(s: str) -> bool:
    return any(ch.isdigit() for ch in s)


def score_answer(prediction: str, answer: str) -> bool:
    """Strict exact-match rule for eval.jsonl / eval_reason.jsonl: only the first answer span counts.

    1. The span: `first_answer_span` (inside `<answer>` if tagged, else without `<think>`; the first
       line; up to the first separator such as "," ";" "/" "、" "，" " or " "或"). So a hedge or a list
       scores only by its first value ("8, 7" and "8 or 7" are wrong for 7).
    2. Both sides are normalized (`normalize_answer`: NFKC, lower case, punctuation removed).
    3. True when the span is the answer, or contains it exactly once as whole words (a Chinese
       answer: as a substring, there being no spaces) with at most MAX_EXTRA_WORDS other words
       (Chinese: MAX_EXTRA_CHARS other characters) around it, none of them containing a digit.
       So "It is Velora." and "它是红色的" are right, "1 2 3 4 5 6 7 8" (all on one line), "7 8 9",
       "17" and "Veloran" are wrong for 7 / Velora.
    An empty prediction never matches.
    """
    p, a = normalize_answer(first_answer_span(prediction, answer)), normalize_answer(answer)
    if not p or not a:
        return False
    if p == a:
        return True
    if _is_cjk(a):
        if p.count(a) != 1:
            return False
        rest = p.replace(a, "", 1).replace(" ", "")
        return len(rest) <= MAX_EXTRA_CHARS and not _has_digit(rest)
    words, aw = p.split(), a.split()
    hits = [i for i in range(len(words) - len(aw) + 1) if words[i:i + len(aw)] == aw]
    if len(hits) != 1:
        return False
    rest = words[:hits[0]] + words[hits[0] + len(aw):]
    return len(rest) <= MAX_EXTRA_WORDS and not any(_has_digit(w) for w in rest)
