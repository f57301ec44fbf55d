"""Conversation encoding for the post-SFT stages (LoRA, DPO, distillation, reasoning): minimind's jsonl
formats read as they are, tokenized on the fly (these sets are small), padded per batch.

    encode_conversation(tok, messages, max_len, only_last) -> (input_ids, labels)
        ChatML ids[:-1] and pre-shifted labels (labels[t] = ids[t + 1] where that token is on an
        assistant turn — content + <|im_end|> — else -100), as llmcore.data's SFTDataset makes them.
        DPO pairs score only the last assistant turn (the completion), as llmcore.data.prep does.
    ChatDataset(path | records, tok, max_len)         {"conversations": [...]}        -> input_ids, labels
    PairDataset(path | records, tok, max_len)         {"chosen": [...], "rejected": [...]}
        -> chosen_ids, chosen_labels, rejected_ids, rejected_labels
    pad_collate / pair_collate                        right-pad to the longest row (pad 0, label -100);
        pair_collate stacks [chosen; rejected] into one (2B, S) batch so a single forward scores both.

Truncation keeps the first max_len tokens (prompt first; the tail of a long answer is cut).
Files are read by the one jsonl reader (llmcore.data.jsonl: `path:line` errors, skip_bad), and
record lists given directly are checked by the same rules.
"""
import torch

from llmcore.data import jsonl

IGNORE = -100


def read_jsonl(path_or_records, kind: str = "json", skip_bad: bool = False):
    """Records of `kind` (llmcore.data.jsonl: "json" = raw objects, "sft", "dpo", "eval") from a jsonl
    path, or from a list of already-decoded records (checked the same way; a bad one raises
    ValueError naming its index unless skip_bad)."""
    if not isinstance(path_or_records, (list, tuple)):
        return jsonl.read_jsonl(path_or_records, kind, skip_bad=skip_bad)
    out = []
    for i, r in enumerate(path_or_records):
        try:
            out.append(jsonl.check_record(kind, r))
        except ValueError as e:
            if not skip_bad:
                raise jsonl.BadLine(f"record {i}: {e}") from None
    return out


def encode_conversation(tok, messages, max_len: int = 512, only_last: bool = False):
    """(input_ids, labels) lists of equal length <= max_len from the ChatML ids and loss mask of
    llmcore.data.prep.encode_conversation (the same tokens as the prepared SFT/DPO shards):
    input_ids = ids[:-1], labels[t] = ids[t + 1] where mask[t + 1] (assistant content + <|im_end|>;
    only the last assistant turn when only_last), else -100."""
    from llmcore.data.prep import encode_conversation as _encode

    ids, mask = _encode(tok, messages, only_last)
    ids, mask = ids[:max_len + 1].tolist(), mask[:max_len + 1].tolist()
    labels = [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]
    return ids[:-1], labels



def _check_not_empty(items, src, max_len):
    if not items:
        name = src if not isinstance(src, (list, tuple)) else f"the {len(src)} given records"
        raise jsonl.NoData(f"{name}: no conversation keeps an assistant token within max_len={max_len} tokens")


class ChatDataset:
    def __init__(self, src, tok, max_len: int = 512, skip_bad: bool = False):
        self.items = []
        for msgs in read_jsonl(src, "sft", skip_bad):
            ids, lab = encode_conversation(tok, msgs, max_len)
            if any(l != IGNORE for l in lab):
                self.items.append((torch.tensor(ids), torch.tensor(lab)))
        _check_not_empty(self.items, src, max_len)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        ids, lab = self.items[i]
        return {"input_ids": ids, "labels": lab}


class PairDataset:
    def __init__(self, src, tok, max_len: int = 512, skip_bad: bool = False):
        self.items = []
        for chosen, rejected in read_jsonl(src, "dpo", skip_bad):
            c_ids, c_lab = encode_conversation(tok, chosen, max_len, only_last=True)
            r_ids, r_lab = encode_conversation(tok, rejected, max_len, only_last=True)
            if any(l != IGNORE for l in c_lab) and any(l != IGNORE for l in r_lab):
                self.items.append(tuple(torch.tensor(x) for x in (c_ids, c_lab, r_ids, r_lab)))
        _check_not_empty(self.items, src, max_len)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        c, cl, r, rl = self.items[i]
        return {"chosen_ids": c, "chosen_labels": cl, "rejected_ids": r, "rejected_labels": rl}


def _pad(rows, value, length):
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def pad_collate(items):
    """[{input_ids, labels}] -> {input_ids (B, S), labels (B, S)}, S = longest row."""
    n = max(len(it["input_ids"]) for it in items)
    return {"input_ids": _pad([it["input_ids"] for it in items], 0, n),
            "labels": _pad([it["labels"] for it in items], IGNORE, n)}


def pair_collate(items):
    """[{chosen_*, rejected_*}] -> {input_ids (2B, S), labels (2B, S)}: rows 0..B-1 chosen, B..2B-1 rejected."""
    rows = [it["chosen_ids"] for it in items] + [it["rejected_ids"] for it in items]
    labs = [it["chosen_labels"] for it in items] + [it["rejected_labels"] for it in items]
    n = max(len(r) for r in rows)
    return {"input_ids": _pad(rows, 0, n), "labels": _pad(labs, IGNORE, n)}
