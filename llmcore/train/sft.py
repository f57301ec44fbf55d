"""Supervised fine-tuning stage: loss on assistant tokens only (labels -100 elsewhere), on an SFT
shard (llmcore.data.prep.prepare_sft), starting from a pretrained checkpoint.

Conversations are packed into rows of seq_len (SFTDataset(pack=True)); positions restart per
conversation, so they never attend to each other. Also: `answer` / `heldout_accuracy`, greedy
answers to held-out questions (eval.jsonl) scored with llmcore.data.corpus.score_answer.
"""
import torch

from llmcore.data.datasets import SFTDataset, collate
from llmcore.model.generate import generate
from llmcore.train import checkpoint
from llmcore.train.loop import TrainConfig, lm_loss, train
from llmcore.train.pretrain import holdout_split


def sft(shard_dir, init_from, cfg: TrainConfig, seq_len: int = 256, pack: bool = True, eval_items: int = 32,
        resume: bool = False, backend=None, model=None):
    """Fine-tune the checkpoint `init_from` (or `model`). Returns (model, history)."""
    torch.manual_seed(cfg.seed)
    if model is None:
        model = checkpoint.load_model(init_from, backend=backend)
    data = SFTDataset(shard_dir, seq_len, pack=pack, seed=cfg.seed)
    train_ds, eval_ds = holdout_split(data, eval_items)
    history = train(model, train_ds, cfg, lm_loss, eval_ds, collate=collate, resume=resume)
    return model, history


def chat_prompt(tokenizer, question: str, system: str = None):
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(msgs, add_generation_prompt=True)


def answer(model, tokenizer, question: str, max_new_tokens: int = 24, **sampling):
    """The model's reply to one question (greedy unless sampling options say otherwise)."""
    sampling.setdefault("temperature", 0.0)
    ids = generate(model, [chat_prompt(tokenizer, question)], max_new_tokens,
                   stop_tokens=(tokenizer.im_end_id, tokenizer.eos_id), **sampling)[0]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def read_eval(path, limit: int = 0, skip_bad: bool = False):
    """Held-out questions: {"question", "answer", ...} or minimind conversation records
    (llmcore.data.jsonl kind "eval"); the first `limit` when limit > 0."""
    from llmcore.data.jsonl import read_jsonl

    return read_jsonl(path, "eval", skip_bad=skip_bad, limit=limit)


@torch.no_grad()
def heldout_accuracy(model, tokenizer, records, max_new_tokens: int = 16):
    """Fraction of records {"question", "answer"} answered right (score_answer), greedy decoding.
    Returns (accuracy, [(question, prediction, answer, ok)])."""
    from llmcore.data.corpus import score_answer

    rows = []
    for r in records:
        pred = answer(model, tokenizer, r["question"], max_new_tokens)
        rows.append((r["question"], pred, r["answer"], bool(score_answer(pred, r["answer"]))))
    return sum(ok for *_, ok in rows) / max(1, len(rows)), rows
