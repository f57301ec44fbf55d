"""Byte-level BPE tokenizer (HF `tokenizers`) with a fixed special-token layout and ChatML.

Special tokens — fixed ids, the same in every tokenizer this module trains (minimind's layout):

    id  token            role
    0   <|endoftext|>    pad and unk (pad_id == unk_id == 0)
    1   <|im_start|>     bos: opens every pretraining document and every ChatML turn
    2   <|im_end|>       eos: closes every pretraining document and every ChatML turn
    3   <think>          opens a reasoning trace
    4   </think>         closes it
    5   <answer>         opens the final answer of a reasoning reply
    6   </answer>        closes it

bos and eos ARE the ChatML turn markers (bos_id == im_start_id, eos_id == im_end_id), as in
minimind: a pretrained model already ends text with the token that ends an assistant turn, so
generation has one stop id (eos_id) in every stage. Ids 0-2 are "special" (dropped by
`decode(skip_special_tokens=True)`); the think/answer tags are ordinary added tokens (kept, so a
decoded reasoning reply keeps its structure). All seven are matched atomically in raw text.

Pre-tokenization: digits are split one per token (arithmetic is learned digit by digit), CJK
characters are isolated one per pre-token (Chinese BPE merges stay within a character), then
GPT-2 byte-level splitting without a prefix space; the decoder is byte-level, so
`decode(encode(s)) == s` for any string.

ChatML rendering (the jinja `chat_template` saved in tokenizer_config.json, and `render_chat`):

    <|im_start|>{role}\\n{content}<|im_end|>\\n     for every message, in order
    <|im_start|>assistant\\n                        appended when add_generation_prompt=True

No default system prompt is inserted (short sequences matter for tiny models).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as _HFTokenizer

PAD_TOKEN = UNK_TOKEN = "<|endoftext|>"
BOS_TOKEN = IM_START = "<|im_start|>"
EOS_TOKEN = IM_END = "<|im_end|>"
THINK_START, THINK_END = "<think>", "</think>"
ANSWER_START, ANSWER_END = "<answer>", "</answer>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END, THINK_START, THINK_END, ANSWER_START, ANSWER_END]
# Tokens dropped by decode(skip_special_tokens=True); the think/answer tags are kept.
_SKIPPED_SPECIALS = {PAD_TOKEN, IM_START, IM_END}

PAD_ID = UNK_ID = 0
BOS_ID = IM_START_ID = 1
EOS_ID = IM_END_ID = 2
THINK_START_ID, THINK_END_ID = 3, 4
ANSWER_START_ID, ANSWER_END_ID = 5, 6

ROLES = ("system", "user", "assistant")

# The jinja twin of render_chat(); transformers renders it, tests check both agree id for id.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """ChatML text of `messages` ([{"role", "content"}, ...]); see the module docstring."""
    parts = [f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages]
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts)


def loss_mask_spans(messages: Sequence[dict], only_last: bool = False) -> list[tuple[int, int]]:
    """Character spans of `render_chat(messages)` that carry loss: each assistant content plus
    its `<|im_end|>` (only the last assistant message when only_last)."""
    spans, pos = [], 0
    for m in messages:
        header = f"{IM_START}{m['role']}\n"
        start = pos + len(header)
        end = start + len(m["content"]) + len(IM_END)
        if m["role"] == "assistant":
            spans.append((start, end))
        pos = end + 1  # the "\n" after <|im_end|>
    return spans[-1:] if only_last else spans


def _has_layout(hf: _HFTokenizer) -> bool:
    return all(hf.token_to_id(t) == i for i, t in enumerate(SPECIAL_TOKENS))


def tokenizer_from_spec(spec: tuple):
    """The tokenizer a `worker_spec()` describes (prep's worker processes rebuild it from this)."""
    kind, payload = spec
    if kind == "llmcore":
        return Tokenizer.from_str(payload)
    from llmcore.data.hf_tokenizer import HFTokenizer

    return HFTokenizer(payload)


# CJK ideographs and CJK / full-width punctuation, isolated one per pre-token.
_CJK_CHAR = "[\u2e80-\u2fff\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]"


def _new_hf_tokenizer(split_cjk: bool = True) -> _HFTokenizer:
    tok = _HFTokenizer(models.BPE(unk_token=None, byte_fallback=False))
    steps = [pre_tokenizers.Digits(individual_digits=True)]
    if split_cjk:
        steps.append(pre_tokenizers.Split(Regex(_CJK_CHAR), behavior="isolated"))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    return tok


def _fix_special_flags(tok: _HFTokenizer) -> _HFTokenizer:
    """Mark only pad/bos/eos as special (think/answer stay visible in decode) and check ids."""
    data = json.loads(tok.to_str())
    for entry in data["added_tokens"]:
        entry["special"] = entry["content"] in _SKIPPED_SPECIALS
        entry["normalized"] = False
    tok = _HFTokenizer.from_str(json.dumps(data, ensure_ascii=False))
    for i, t in enumerate(SPECIAL_TOKENS):
        got = tok.token_to_id(t)
        if got != i:
            raise RuntimeError(f"special token {t!r} has id {got}, expected {i}")
    return tok


def _iter_texts(jsonl_paths: Iterable[str | os.PathLike]) -> Iterable[str]:
    """Every text field of minimind jsonl files: pretrain "text", SFT "conversations" contents,
    DPO "chosen"/"rejected" contents, read by the one jsonl reader's line walk (BOM dropped; an
    empty file is an error). Lines that do not decode or parse are passed over here: prep, which
    runs next on the same files, reports them as file:line (or skips them with --skip-bad)."""
    from llmcore.data.jsonl import iter_lines

    for _, _, line, _, err in iter_lines(list(jsonl_paths)):
        if err is not None:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict):
            continue
        if isinstance(rec.get("text"), str):
            yield rec["text"]
        for key in ("conversations", "chosen", "rejected"):
            msgs = rec.get(key)
            if isinstance(msgs, list):
                for m in msgs:
                    if isinstance(m, dict) and isinstance(m.get("content"), str):
                        yield m["content"]


def train_tokenizer(
    jsonl_paths: Sequence[str | os.PathLike],
    vocab_size: int = 6400,
    out_dir: str | os.PathLike | None = None,
    min_frequency: int = 2,
    split_cjk: bool = True,
) -> "Tokenizer":
    """Train a byte-level BPE tokenizer on the text of minimind jsonl files.

    vocab_size counts everything: the 7 special tokens, the 256 byte symbols and the merges; it
    is an upper bound (a small corpus runs out of pairs seen `min_frequency` times first: read
    `.vocab_size` of the result). split_cjk=True isolates each CJK character before BPE, so
    Chinese is tokenized about one character per token instead of whole memorized phrases (which
    a tiny corpus of repeated templates would otherwise produce, hiding the facts inside template
    tokens). Deterministic for fixed inputs. Writes the HF files to `out_dir` when given.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must be >= {len(SPECIAL_TOKENS) + 256}, got {vocab_size}")
    tok = _new_hf_tokenizer(split_cjk)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_iter_texts(jsonl_paths), trainer=trainer)
    out = Tokenizer(_fix_special_flags(tok))
    if out_dir is not None:
        out.source_dir = out.save(out_dir).resolve()
    return out


class Tokenizer:
    """A trained byte-level BPE tokenizer with the fixed special ids of this module.

    encode/decode work on plain strings; special-token strings inside the text are matched as
    their ids (as transformers does). `apply_chat_template` equals transformers'
    `AutoTokenizer.from_pretrained(dir).apply_chat_template(messages, tokenize=True)` id for id.
    """

    pad_id = PAD_ID
    unk_id = UNK_ID
    bos_id = BOS_ID
    eos_id = EOS_ID
    im_start_id = IM_START_ID
    im_end_id = IM_END_ID
    think_start_id = THINK_START_ID
    think_end_id = THINK_END_ID
    answer_start_id = ANSWER_START_ID
    answer_end_id = ANSWER_END_ID
    special_tokens = tuple(SPECIAL_TOKENS)
    chat_template = CHAT_TEMPLATE

    def __init__(self, hf_tokenizer: _HFTokenizer, source_dir: Path | None = None):
        self._tok = hf_tokenizer
        self.source_dir = source_dir  # the directory it was loaded from (recorded in checkpoint meta)
        for i, t in enumerate(SPECIAL_TOKENS):
            if hf_tokenizer.token_to_id(t) != i:
                raise ValueError(f"tokenizer does not have the fixed layout: {t!r} is not id {i}")

    # ---- construction / persistence -------------------------------------------------------
    @classmethod
    def from_str(cls, tokenizer_json: str) -> "Tokenizer":
        return cls(_HFTokenizer.from_str(tokenizer_json))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load from a directory holding tokenizer.json (or from the tokenizer.json file). A directory
        whose tokenizer is not of this module's layout (an imported model's own) loads as an
        llmcore.data.hf_tokenizer.HFTokenizer (same interface; its chat template and special tokens),
        or raises ValueError saying why it cannot."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"no tokenizer at {file}")
        hf = _HFTokenizer.from_file(str(file))
        if not _has_layout(hf) and path.is_dir():
            from llmcore.data.hf_tokenizer import HFTokenizer

            return HFTokenizer(path)
        return cls(hf, source_dir=file.parent.resolve())

    def worker_spec(self) -> tuple:
        """What a prep worker process needs to rebuild this tokenizer (see tokenizer_from_spec)."""
        return ("llmcore", self.to_str())

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write tokenizer.json, tokenizer_config.json (with the ChatML chat_template) and
        special_tokens_map.json: `transformers.AutoTokenizer.from_pretrained(out_dir)` loads it."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "tokenizer.json").write_text(self.to_str(), encoding="utf-8")
        added = {
            str(i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": t in _SKIPPED_SPECIALS,
            }
            for i, t in enumerate(SPECIAL_TOKENS)
        }
        config = {
            "add_bos_token": False,
            "add_eos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": added,
            "additional_special_tokens": [],
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "pad_token": PAD_TOKEN,
            "unk_token": UNK_TOKEN,
            "clean_up_tokenization_spaces": False,
            "spaces_between_special_tokens": False,
            "legacy": True,
            "model_max_length": 32768,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "chat_template": CHAT_TEMPLATE,
        }
        (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
        special_map = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN, "unk_token": UNK_TOKEN}
        (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2), encoding="utf-8")
        return out

    def to_str(self) -> str:
        return self._tok.to_str()

    @property
    def hash(self) -> str:
        """sha256 (first 16 hex digits) of the serialized tokenizer: identifies it in shard meta."""
        return hashlib.sha256(self.to_str().encode("utf-8")).hexdigest()[:16]

    @property
    def hf(self) -> _HFTokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    # ---- text <-> ids --------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no bos/eos added; special-token strings map to their ids)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and the (start, end) character span of each token in `text`."""
        e = self._tok.encode(text, add_special_tokens=False)
        return e.ids, e.offsets

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; skip_special_tokens drops pad/bos/eos (<|endoftext|>, <|im_start|>,
        <|im_end|>) but keeps the <think>/<answer> tags."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    # ---- chat ------------------------------------------------------------------------------
    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        return render_chat(messages, add_generation_prompt)

    def loss_mask_spans(self, messages: Sequence[dict], only_last: bool = False) -> list[tuple[int, int]]:
        return loss_mask_spans(messages, only_last)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> list[int]:
        """Ids of the ChatML rendering of `messages` (see the module docstring)."""
        return self.encode(render_chat(messages, add_generation_prompt))

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, hash={self.hash})"
