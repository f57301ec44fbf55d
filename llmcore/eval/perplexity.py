"""Perplexity of a causal LM on text.

    ppl = exp( sum_t -log p(x_t | x_<t) / n )     over every predicted token t of every document

Each document is tokenized as [bos] + tokens + [eos] (bos/eos optional); the first token is only
context (never predicted). Documents longer than `max_len` are cut into consecutive windows of
`max_len` tokens; with `stride < max_len` each window after the first re-reads the previous
`max_len - stride` tokens as context and scores only its new tokens (the HF "sliding window" rule);
with stride == max_len (default) a window starts at the last token of the previous one (one token of
context). Every token after the first is scored exactly once. Log-probabilities are computed in fp32 (log_softmax).

`model` is any callable (B, S) LongTensor -> logits (B, S, V) (an llmcore Transformer, an HF model
wrapped with `hf_logits`, or a test double).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch


def hf_logits(hf_model) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda ids: hf_model(ids).logits


def read_texts(path: str | Path, field: str | None = None, skip_bad: bool = False) -> list[str]:
    """Documents of a .jsonl file (field `text` by default, else the concatenated `content` of
    `conversations`, else `question` + newline + `answer`) or of a plain text file (one document per
    non-empty line). jsonl goes through the one reader (llmcore.data.jsonl: `path:line` errors,
    skip_bad)."""
    from llmcore.data.jsonl import json_error, read_jsonl

    path = Path(path)
    if path.suffix != ".jsonl":
        return [ln.strip() for ln in path.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]

    def text_of(line):
        rec = json.loads(line)
        if not isinstance(rec, dict):
            raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
        if field is not None:
            if field not in rec:
                raise ValueError(f"missing key '{field}'")
            return str(rec[field])
        if isinstance(rec.get("text"), str):
            return rec["text"]
        if isinstance(rec.get("conversations"), list):
            return "\n".join(str(m.get("content", "")) for m in rec["conversations"] if isinstance(m, dict))
        if "question" in rec and "answer" in rec:  # the bundled corpus' eval records
            return f"{rec['question']}\n{rec['answer']}"
        raise ValueError("no 'text', 'conversations' or 'question'/'answer' field (use --field)")

    def parse(line):
        try:
            return text_of(line)
        except json.JSONDecodeError as e:
            raise ValueError(json_error(e)) from None

    return read_jsonl(path, parse, skip_bad=skip_bad)


@torch.no_grad()
def token_nll(model, ids: Sequence[int], max_len: int, stride: int | None = None, device="cpu") -> tuple[float, int]:
    """(sum of -log p over predicted tokens, number of predicted tokens) for one token sequence."""
    stride = stride or max_len
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    if not 0 < stride <= max_len:
        raise ValueError(f"stride must be in (0, max_len={max_len}], got {stride}")
    ids = list(ids)
    if len(ids) < 2:
        return 0.0, 0
    total, count = 0.0, 0
    scored_upto = 1  # tokens [0, scored_upto) are context only / already scored
    start = 0
    while scored_upto < len(ids):
        end = min(start + max_len, len(ids))
        window = torch.tensor([ids[start:end]], dtype=torch.long, device=device)
        logits = model(window)
        if isinstance(logits, tuple):
            logits = logits[0]
        logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)  # predicts window[1:]
        tgt = window[0, 1:]
        lp = logp.gather(1, tgt[:, None])[:, 0]  # lp[j] = log p(ids[start + j + 1])
        first = scored_upto - start - 1  # index into lp of the first unscored target
        total += float(-lp[first:].sum())
        count += lp.shape[0] - first
        scored_upto = end
        if end == len(ids):
            break
        # the next window re-reads max_len - stride tokens (at least the last one) as context
        start = end - max(1, max_len - stride)
    return total, count


def perplexity(model, texts: Iterable[str], tokenizer, max_len: int = 512, stride: int | None = None,
               add_bos: bool = True, add_eos: bool = True, device="cpu") -> dict:
    """Corpus perplexity: {"ppl", "nll" (mean per token), "tokens", "documents"}."""
    total, count, docs = 0.0, 0, 0
    was = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        for text in texts:
            ids = tokenizer.encode(text)
            if add_bos:
                ids = [tokenizer.bos_id] + ids
            if add_eos:
                ids = ids + [tokenizer.eos_id]
            s, n = token_nll(model, ids, max_len, stride, device)
            total += s
            count += n
            docs += 1
    finally:
        if was and hasattr(model, "train"):
            model.train()
    if count == 0:
        raise ValueError("no tokens to score (empty input)")
    nll = total / count
    return {"ppl": math.exp(nll), "nll": nll, "tokens": count, "documents": docs}
