"""A transformers tokenizer (any tokenizer.json + tokenizer_config.json with a chat template) behind
the interface of llmcore.data.tokenizer.Tokenizer, so data prep, SFT loss masks, chat, serving and
export use an imported model's own template and special tokens.

    tok = HFTokenizer(dir)              # or Tokenizer.load(dir), which returns one when the layout is not ours
    tok.apply_chat_template(messages, add_generation_prompt=True) -> ids   (the model's own template)
    tok.loss_mask_spans(messages, only_last=False) -> [(start, end)]         character spans of the
        rendered conversation that carry loss: each assistant turn's text and its end-of-turn marker

How the assistant spans are found (the template is a black box): for assistant message i, the text
rendered for messages[:i] with the generation prompt is, for every common template (ChatML / Qwen,
Llama 3, Mistral), a prefix of the full rendering, and so is the rendering of messages[:i + 1]; the
span is what lies between the two, less trailing whitespace. Templates that render a past turn
differently from a last one (Qwen3 drops the <think> part of earlier replies) fall back to finding
the message's text in the full rendering after the previous span, extended over an end-of-turn
token written right after it. A turn found neither way is an error for that record.

Special ids: eos_id is the tokenizer's eos; im_end_id is the end-of-turn token the template writes
after an assistant reply (ChatML's <|im_end|>, Llama 3's <|eot_id|>), eos when none; bos_id may be
None (Qwen has none): pretraining documents then get no bos. Needs transformers (import extra).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Sequence


class HFTokenizer:
    def __init__(self, path):
        try:
            from transformers import AutoTokenizer
        except ImportError as e:  # pragma: no cover - transformers is a test/serve dependency
            raise ValueError(f"{path}: a non-llmcore tokenizer needs transformers installed ({e})") from None
        path = Path(path)
        self._t = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if not getattr(self._t, "is_fast", False):
            raise ValueError(f"{path}: only fast tokenizers (tokenizer.json) are supported")
        if not getattr(self._t, "chat_template", None):
            raise ValueError(f"{path}: the tokenizer has no chat_template (tokenizer_config.json / chat_template.jinja): "
                             f"llmcore needs one to build SFT data and prompts")
        self.source_dir = path.resolve()
        self._tok = self._t.backend_tokenizer
        self.eos_id = self._t.eos_token_id
        if self.eos_id is None:
            raise ValueError(f"{path}: the tokenizer defines no eos token")
        self.bos_id = self._t.bos_token_id
        self.pad_id = self._t.pad_token_id if self._t.pad_token_id is not None else self.eos_id
        self.unk_id = self._t.unk_token_id
        self.im_end_id = self._end_of_turn()
        self.im_start_id = None
        self.think_start_id, self.think_end_id = self.token_to_id("<think>"), self.token_to_id("</think>")
        self.answer_start_id, self.answer_end_id = self.token_to_id("<answer>"), self.token_to_id("</answer>")

    @classmethod
    def load(cls, path) -> "HFTokenizer":
        return cls(path)

    def _end_of_turn(self) -> int:
        """The special token the template writes right after an assistant reply (else eos)."""
        msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "zq7"}]
        text = self.render_chat(msgs)
        tail = text[text.rfind("zq7") + 3:]
        for i in self.encode(tail)[:2]:
            if i in set(self._t.all_special_ids):
                return i
        return self.eos_id

    # ---- persistence / identity -----------------------------------------------------------
    def save(self, out_dir) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self._t.save_pretrained(str(out))
        return out

    def to_str(self) -> str:
        return self._tok.to_str()

    def worker_spec(self) -> tuple:
        """What a prep worker process needs to rebuild this tokenizer (see tokenizer_from_spec)."""
        return ("hf", str(self.source_dir))

    @property
    def hash(self) -> str:
        h = hashlib.sha256(self.to_str().encode("utf-8"))
        h.update(json.dumps(self._t.chat_template, sort_keys=True).encode("utf-8"))
        return h.hexdigest()[:16]

    @property
    def hf(self):
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return len(self._t)

    def __len__(self) -> int:
        return self.vocab_size

    # ---- text <-> ids --------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no bos/eos added; special-token strings map to their ids)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode_with_offsets(self, text: str):
        e = self._tok.encode(text, add_special_tokens=False)
        return e.ids, e.offsets

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._t.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str):
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int):
        return self._tok.id_to_token(int(i))

    # ---- chat ------------------------------------------------------------------------------
    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        return self._t.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt))

    def loss_mask_spans(self, messages: Sequence[dict], only_last: bool = False) -> list[tuple[int, int]]:
        """Character spans of render_chat(messages) that carry loss (see the module docstring)."""
        full = self.render_chat(messages)
        end_marks = [t for t in (self.id_to_token(self.im_end_id), self.id_to_token(self.eos_id)) if t]
        spans, cursor = [], 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render_chat(messages[:i], add_generation_prompt=True) if i else ""
            upto = self.render_chat(messages[:i + 1])
            if i and full.startswith(before) and full.startswith(upto) and len(upto) > len(before) >= cursor:
                start, end = len(before), len(upto)
            else:
                start = full.find(m["content"], cursor)
                if start < 0 or not m["content"]:
                    raise ValueError(f"assistant turn {i} is not found in the rendered chat template")
                end = start + len(m["content"])
                for mark in end_marks:
                    j = full.find(mark, end)
                    if j >= 0 and not full[end:j].strip():
                        end = j + len(mark)
                        break
            while end > start and full[end - 1].isspace():
                end -= 1
            spans.append((start, end))
            cursor = end
        return spans[-1:] if only_last else spans

    def __repr__(self) -> str:
        return f"HFTokenizer({self.source_dir.name}, vocab_size={self.vocab_size}, hash={self.hash})"
