"""Reasoning distillation stage (minimind train_distill_reason.py): SFT on replies shaped
`<think>…</think><answer>…</answer>` with the four tag tokens weighted x`tag_weight` (10) in the CE,
so the format sticks in a small model. `format_rate` measures it on held-out prompts, and
`split_reasoning` separates the think part for chat display.
"""
import re

import torch

from llmcore.train.chatdata import pad_collate
from llmcore.train.losses import weighted_token_ce
from llmcore.train.loop import train

FORMAT = re.compile(r"^\s*<think>(.+?)</think>\s*<answer>(.+?)</answer>\s*$", re.S)


def tag_ids(tok):
    return (tok.think_start_id, tok.think_end_id, tok.answer_start_id, tok.answer_end_id)


def make_reason_loss(weight_ids, tag_weight: float = 10.0):
    def loss_fn(model, batch):
        logits = model(batch["input_ids"])
        return weighted_token_ce(logits, batch["labels"], weight_ids, tag_weight), {}
    return loss_fn


def train_reason(model, dataset, cfg, tok, tag_weight: float = 10.0, eval_dataset=None):
    return train(model, dataset, cfg, loss_fn=make_reason_loss(tag_ids(tok), tag_weight),
                 eval_dataset=eval_dataset, collate=pad_collate)


def split_reasoning(text: str):
    """(think, answer) from a reply; think "" when absent; answer = the inside of <answer> if present,
    else the text after </think> (or the whole text)."""
    think = ""
    m = re.search(r"<think>(.*?)(</think>|$)", text, re.S)
    if m:
        think = m.group(1).strip()
        text = text[m.end():]
    a = re.search(r"<answer>(.*?)(</answer>|$)", text, re.S)
    return think, (a.group(1) if a else text).strip()


def is_formatted(text: str) -> bool:
    return FORMAT.match(text) is not None


def greedy_reply(model, tok, messages, max_new_tokens: int = 96, device="cpu"):
    """Greedy (temperature 0) KV-cache decoding of one assistant reply, until <|im_end|>."""
    from llmcore.model.generate import generate

    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    out = generate(model, [ids], max_new_tokens, temperature=0.0, stop_tokens=(tok.eos_id,))[0]
    return tok.decode(out)


def format_rate(model, tok, records, max_new_tokens: int = 96, device="cpu"):
    """Fraction of held-out prompts ({"question"}) whose greedy reply is exactly
    <think>…</think><answer>…</answer>, and the fraction whose answer scores correct (score_answer)."""
    from llmcore.data.corpus import score_answer

    model.eval()
    ok = right = 0
    for r in records:
        text = greedy_reply(model, tok, [{"role": "user", "content": r["question"]}], max_new_tokens, device)
        ok += is_formatted(text)
        right += bool(score_answer(text, r["answer"]))
    return ok / max(len(records), 1), right / max(len(records), 1)
