"""The one jsonl reader: every stage that reads minimind-format files goes through it, with the same rules.

    read_jsonl(paths, kind, skip_bad=False) -> [record]     kind: pretrain | sft | dpo | eval
    iter_lines(paths) -> (path, lineno, line, nbytes, error)  the raw line walk (prep's workers parse)
    parse_record(kind, line) -> record                      one line; ValueError(reason) when malformed

Formats (minimind's, as they are):
    pretrain  {"text": str}                                  -> the text
    sft       {"conversations": [{role, content}, ...]}      -> the messages (reasoning SFT too)
    dpo       {"chosen": [...], "rejected": [...]}           -> (chosen, rejected), both ending with an
                                                                assistant turn
    json      any JSON object                                -> the object
    eval      {"question": str, "answer": str, ...}          -> the record (extra keys kept)
              or {"conversations": [..., user, assistant]}   -> {"question": last user turn,
                                                                "answer": the last assistant turn (its
                                                                <answer>…</answer> part when tagged),
                                                                "reference": that turn as written}

Rules, the same for every file:
- A UTF-8 byte order mark at the start of a file is dropped. Blank lines are ignored.
- A line that is not valid UTF-8, not JSON, not an object, or lacks / mistypes a field is malformed:
  reported as `path:line: what is wrong` (BadLine). skip_bad=False (default) raises on the first one;
  skip_bad=True (the CLIs' --skip-bad) skips it, counts it, and prints the count and the first ones.
- A file with no line at all is an error (`path: empty file`), and so is a set of files with no
  usable line (`path: no usable line (...)`), whatever skip_bad says.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Callable, Iterator, Sequence

ROLES = ("system", "user", "assistant")
KINDS = ("pretrain", "sft", "dpo", "eval", "json")
_BOM = b"\xef\xbb\xbf"


class BadLine(ValueError):
    """A malformed jsonl line; str() is `path:line: reason`."""


class NoData(ValueError):
    """An empty file, or files without one usable line; str() names them."""


def _paths(paths) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = [Path(p) for p in paths]
    for p in out:
        if not p.is_file():
            raise FileNotFoundError(f"no such jsonl file: {p}")
    return out


def iter_lines(paths) -> Iterator[tuple[str, int, str | None, int, str | None]]:
    """(path, lineno, line, nbytes, error) for every non-blank line of the files, in order: line is
    the decoded text (BOM dropped) or None when `error` says why it could not be decoded.
    Raises NoData for a file with no bytes at all."""
    for path in _paths(paths):
        if path.stat().st_size == 0:
            raise NoData(f"{path}: empty file")
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                n = len(raw)
                if lineno == 1 and raw.startswith(_BOM):
                    raw = raw[len(_BOM):]
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield str(path), lineno, None, n, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
                    continue
                if line.strip():
                    yield str(path), lineno, line.rstrip("\r\n"), n, None


def check_messages(msgs, key: str, need_last_assistant: bool = False) -> list:
    """The messages of `key` as [{role, content}] (ValueError naming what is wrong)."""
    if not isinstance(msgs, list):
        raise ValueError(f"'{key}' must be a list of messages, got {type(msgs).__name__}")
    if not msgs:
        raise ValueError(f"empty conversation in '{key}'")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ValueError(f"'{key}'[{i}] must be an object with 'role' and 'content'")
        if "role" not in m or "content" not in m:
            raise ValueError(f"'{key}'[{i}] is missing 'role' or 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"'{key}'[{i}] has role {m['role']!r}, expected one of system/user/assistant")
        if not isinstance(m["content"], str):
            raise ValueError(f"'{key}'[{i}] content must be a string, got {type(m['content']).__name__}")
    if not any(m["role"] == "assistant" for m in msgs):
        raise ValueError(f"'{key}' has no assistant message (nothing to learn)")
    if need_last_assistant and msgs[-1]["role"] != "assistant":
        raise ValueError(f"'{key}' must end with an assistant message")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _str_field(rec: dict, key: str, nonempty: bool = True) -> str:
    if key not in rec:
        raise ValueError(f"missing key '{key}'")
    if not isinstance(rec[key], str):
        raise ValueError(f"'{key}' must be a string, got {type(rec[key]).__name__}")
    if nonempty and not rec[key].strip():
        raise ValueError(f"empty '{key}'")
    return rec[key]


_ANSWER = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.S)


def _eval_record(rec: dict) -> dict:
    if "question" in rec or "conversations" not in rec:
        _str_field(rec, "question")
        _str_field(rec, "answer")
        return rec
    msgs = check_messages(rec["conversations"], "conversations")
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    users = [m for m in msgs[:last] if m["role"] == "user"]
    if not users:
        raise ValueError("'conversations' has no user turn before its last assistant turn")
    reference = msgs[last]["content"]
    tagged = _ANSWER.search(reference)
    answer = (tagged.group(1) if tagged else reference).strip()
    if not answer:
        raise ValueError("the last assistant turn has an empty answer")
    system = [m["content"] for m in msgs[:last] if m["role"] == "system"]
    return {**{k: v for k, v in rec.items() if k != "conversations"}, "question": users[-1]["content"],
            "answer": answer, "reference": reference, **({"system": system[0]} if system else {})}


def parse_record(kind: str, line: str):
    """One jsonl line of `kind` (see the module docstring); ValueError(reason) when malformed."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(json_error(e)) from None
    return check_record(kind, rec)


def json_error(e: json.JSONDecodeError) -> str:
    """`invalid JSON: <what> at column N` (json's own messages for some errors already end in "at")."""
    return f"invalid JSON: {e.msg}{'' if e.msg.endswith(' at') else ' at'} column {e.colno}"


def check_record(kind: str, rec):
    """A decoded record of `kind` checked and normalized as parse_record does (kind "json": any object)."""
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    if kind == "json":
        return rec
    if kind == "pretrain":
        return _str_field(rec, "text")
    if kind == "sft":
        if "conversations" not in rec:
            raise ValueError("missing key 'conversations'")
        return check_messages(rec["conversations"], "conversations")
    if kind == "dpo":
        for k in ("chosen", "rejected"):
            if k not in rec:
                raise ValueError(f"missing key '{k}'")
        return check_messages(rec["chosen"], "chosen", True), check_messages(rec["rejected"], "rejected", True)
    if kind == "eval":
        return _eval_record(rec)
    raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")


def report_skipped(n_bad: int, examples: Sequence[str], what: str) -> None:
    """The one line every stage prints when --skip-bad dropped lines."""
    if n_bad:
        shown = "".join(f"\n  {e}" for e in examples[:3])
        print(f"[llmcore] --skip-bad: skipped {n_bad} malformed line(s) in {what}:{shown}", file=sys.stderr)


def read_jsonl(paths, kind: str | Callable[[str], object], skip_bad: bool = False, limit: int = 0,
               stats: dict | None = None) -> list:
    """Every record of the files (see the module docstring for kinds and rules). `kind` may also be
    a function line -> record raising ValueError. `limit` > 0 stops after that many records.
    `stats`, when given, receives {"num_bad", "bad_examples", "num_lines"}."""
    parse = kind if callable(kind) else (lambda line: parse_record(kind, line))
    plist = _paths(paths)
    out, bad, n_lines = [], [], 0
    for path, lineno, line, _, err in iter_lines(plist):
        n_lines += 1
        if err is None:
            try:
                out.append(parse(line))
            except ValueError as e:
                err = str(e)
        if err is not None:
            msg = f"{path}:{lineno}: {err}"
            if not skip_bad:
                raise BadLine(f"{msg}  (--skip-bad skips malformed lines)")
            bad.append(msg)
        if limit and len(out) >= limit:
            break
    names = ", ".join(str(p) for p in plist)
    if not out:
        raise NoData(f"{names}: no usable line ({n_lines} non-blank line(s), {len(bad)} malformed"
                     + (f"; first: {bad[0]}" if bad else "") + ")")
    report_skipped(len(bad), bad[:10], names)
    if stats is not None:
        stats.update(num_bad=len(bad), bad_examples=bad[:10], num_lines=n_lines)
    return out
