"""Reasoning distillation: the think/answer format sticks on held-out prompts."""
import copy

import torch

from llmcore.train.chatdata import ChatDataset, read_jsonl
from llmcore.train.losses import weighted_token_ce
from llmcore.train.reason import format_rate, is_formatted, split_reasoning, tag_ids, train_reason

from .conftest import quick_cfg

STEPS, N_EVAL = 150, 20


def test_split_and_format():
    t = "<think>3 + 4 = 7. The result is 7.</think><answer>7</answer>"
    assert is_formatted(t) and split_reasoning(t) == ("3 + 4 = 7. The result is 7.", "7")
    assert not is_formatted("7") and split_reasoning("7") == ("", "7")
    assert not is_formatted("<think>x</think>7") and split_reasoning("<think>x</think>7") == ("x", "7")
    assert not is_formatted("<think>x<answer>7</answer>")


def test_reason_format_rate(bundled, sft_model, tmp_path):
    tok, corpus = bundled["tok"], bundled["corpus"]
    held = read_jsonl(corpus["eval_reason"])[:N_EVAL]
    base = sft_model[0]
    rate0, _ = format_rate(base, tok, held, max_new_tokens=160)
    model = copy.deepcopy(base)
    ds = ChatDataset(corpus["reason"], tok, 160)
    assert all(i in {int(t) for it in ds.items[:50] for t in it[1]} for i in tag_ids(tok))
    h = train_reason(model, ds, quick_cfg(tmp_path, STEPS, 2e-3), tok, tag_weight=10.0)
    rate, acc = format_rate(model, tok, held, max_new_tokens=160)
    print(f"\nheld-out think/answer format rate: SFT {rate0:.2f} -> reason {rate:.2f} (answer accuracy {acc:.2f}, "
          f"{len(held)} prompts); {h['seconds']:.1f}s")
    # measured: SFT 0.00 -> 1.00 on 20 held-out prompts (answer accuracy 0.00: a 2-layer model learns the
    # format, not the arithmetic); 0.95 with data's denser world (666da9d)
    assert rate >= 0.8 and rate0 <= 0.1
