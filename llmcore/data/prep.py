"""jsonl -> pre-tokenized, packed shards, made once ahead of training (the trainer never tokenizes).

Shard layout (one directory per prepared split):

    tokens.bin   every document's token ids back to back; np.uint16 when vocab_size < 65536,
                 else np.uint32 (read with np.memmap, dtype from meta.json)
    mask.bin     (SFT / DPO only) np.uint8 per token: 1 where the token carries loss
    docs.npy     int64 (num_docs + 1,): document d is tokens[docs[d]:docs[d + 1]]
    meta.json    {"kind", "dtype", "num_tokens", "num_docs", "vocab_size", "tokenizer_hash",
                  "pad_id", "bos_id", "eos_id", "num_bad", "sources", ...}; written last, so a
                 directory with meta.json is complete

- pretrain (`prepare_pretrain`): each `{"text"}` line -> one document `bos + ids(text) + eos`
  (a text that already starts with `<|im_start|>` / ends with `<|im_end|>`, as minimind's pretrain
  data does, keeps its own: never two bos or two eos).
- SFT (`prepare_sft`): each `{"conversations": [...]}` line -> the ChatML ids of the whole
  conversation (`Tokenizer.apply_chat_template`), mask = 1 on the tokens of every assistant
  content and its closing `<|im_end|>`, 0 on everything else (system and user turns, every
  `<|im_start|>role\\n` header, the "\\n" after each `<|im_end|>`). A token carries loss iff its
  character span lies inside [content start, end of `<|im_end|>`).
- DPO (`prepare_dpo`): `{"chosen": [...], "rejected": [...]}` -> two SFT-like shards
  `chosen/` and `rejected/` (document i of both = pair i); the mask covers only the LAST
  assistant message (the completion being preferred) and its `<|im_end|>`.

Lines are read and checked by the one jsonl reader (llmcore.data.jsonl: BOM dropped, non-UTF-8
bytes, bad JSON, a missing or mistyped key, an empty text or conversation, a role other than
system/user/assistant, a conversation without an assistant turn, a DPO side not ending with an
assistant turn), reported as `path:line: reason`. strict=True (default) raises BadLine on the
first one; strict=False (--skip-bad) skips them and counts them in the returned stats ("num_bad",
"bad_examples"). Blank lines are ignored silently; an empty file, or files without one usable line,
raise NoData.

Caching (`prepare_cached`, what the CLIs use): a shard records the fingerprint of what made it —
the size and SHA-256 of every input file, the tokenizer's hash, the prep settings — and is
re-prepared, saying why, whenever any of them changes (lines appended, another file of the same
name, a new tokenizer).

Work is spread over `num_workers` processes (forked on Linux, spawned elsewhere; each holds the
tokenizer); results come back in file order, so the output is identical whatever the worker count.
Inputs under MIN_BYTES_FOR_POOL (256 KiB) are done in-process (a pool would cost more than it saves).
"""
from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from llmcore.data.jsonl import BadLine, NoData, iter_lines, parse_record, report_skipped  # noqa: F401 (BadLine: re-export)
from llmcore.data.tokenizer import Tokenizer, loss_mask_spans, tokenizer_from_spec  # noqa: F401 (re-export)

CHUNK_LINES = 1024  # lines per unit of work
MIN_BYTES_FOR_POOL = 256 * 1024  # smaller inputs are tokenized in-process


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size < 65536 else np.uint32


# ----------------------------------------------------------------------------------------------
# Parsing and encoding of one record (run inside the workers)
# ----------------------------------------------------------------------------------------------


def encode_conversation(tok: Tokenizer, messages: Sequence[dict], only_last: bool = False):
    """(ids, mask) of a conversation: ids = tok.apply_chat_template(messages); mask (uint8) = 1
    on the tokens inside `tok.loss_mask_spans(messages, only_last)` (the tokenizer's own template)."""
    text = tok.render_chat(messages)
    ids, offsets = tok.encode_with_offsets(text)
    return np.asarray(ids, dtype=np.int64), _mask_from_offsets(offsets, tok.loss_mask_spans(messages, only_last))


def _mask_from_offsets(offsets, spans) -> np.ndarray:
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    mask = np.zeros(len(off), dtype=np.uint8)
    for s, e in spans:
        mask[(off[:, 0] >= s) & (off[:, 1] <= e) & (off[:, 1] > off[:, 0])] = 1
    return mask


_WORKER_TOK: Tokenizer | None = None


def _worker_init(spec: tuple) -> None:
    global _WORKER_TOK
    _WORKER_TOK = tokenizer_from_spec(spec)


def _work(kind: str, chunk: list, tok: Tokenizer | None = None):
    """Encode one chunk of (path, lineno, line). Returns (results, bad): results in order, each
    (ids,) for pretrain, (ids, mask) for sft, (ids_c, mask_c, ids_r, mask_r) for dpo."""
    tok = tok or _WORKER_TOK
    parsed, bad = [], []
    for path, lineno, line, err in chunk:
        if err is None:
            try:
                parsed.append(parse_record(kind, line))
                continue
            except ValueError as e:
                err = str(e)
        bad.append(f"{path}:{lineno}: {err}")
    good = [p for p in parsed if p is not None]
    out = []
    if kind == "pretrain":
        for ids in tok.encode_batch(good):
            out.append((pretrain_ids(ids, tok.bos_id, tok.eos_id),))
    elif kind == "sft":
        texts = [tok.render_chat(m) for m in good]
        encs = tok.hf.encode_batch(texts, add_special_tokens=False)
        for m, e in zip(good, encs):
            out.append((np.asarray(e.ids, dtype=np.int64), _mask_from_offsets(e.offsets, tok.loss_mask_spans(m))))
    else:
        texts = [tok.render_chat(c) for c, r in good] + [tok.render_chat(r) for c, r in good]
        encs = tok.hf.encode_batch(texts, add_special_tokens=False)
        n = len(good)
        for i, (c, r) in enumerate(good):
            ec, er = encs[i], encs[n + i]
            out.append((np.asarray(ec.ids, dtype=np.int64), _mask_from_offsets(ec.offsets, tok.loss_mask_spans(c, True)),
                        np.asarray(er.ids, dtype=np.int64), _mask_from_offsets(er.offsets, tok.loss_mask_spans(r, True))))
    # Keep per-line order information for strict error reporting: bad lines are listed in order.
    return out, bad


def pretrain_ids(ids: list, bos_id: int, eos_id: int) -> np.ndarray:
    """One pretraining document: bos + ids + eos, except that a text which already opens with bos
    or closes with eos (minimind's pretrain text carries `<|im_start|>` … `<|im_end|>`, which are
    our bos / eos) does not get a second one."""
    head = [] if bos_id is None or ids[:1] == [bos_id] else [bos_id]  # a tokenizer may have no bos (Qwen)
    tail = [] if ids[-1:] == [eos_id] else [eos_id]
    return np.asarray(head + ids + tail, dtype=np.int64)


def _work_remote(args):
    kind, chunk = args
    return _work(kind, chunk)


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def _read_chunks(paths: Sequence[Path]):
    """Yield (chunk, nbytes): lists of (path, lineno, line, error) from the files, in order
    (llmcore.data.jsonl.iter_lines: BOM dropped, undecodable lines carry their error)."""
    chunk, nbytes = [], 0
    for path, lineno, line, n, err in iter_lines(paths):
        nbytes += n
        chunk.append((path, lineno, line, err))
        if len(chunk) >= CHUNK_LINES:
            yield chunk, nbytes
            chunk, nbytes = [], 0
    if chunk:
        yield chunk, nbytes


def _make_pool(num_workers: int, tok: Tokenizer):
    """A process pool whose workers each hold the tokenizer.

    fork on Linux: it needs no `if __name__ == "__main__"` guard in the calling script (spawn
    re-imports the main module), and the workers touch only numpy and tokenizers, never torch.
    TOKENIZERS_PARALLELISM is set to false while forking so the children do not warn that the
    parent already used the Rust thread pool; the parent's setting is restored right after.
    Elsewhere (macOS, Windows): spawn.
    """
    if sys.platform.startswith("linux"):
        saved = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            return mp.get_context("fork").Pool(num_workers, initializer=_worker_init, initargs=(tok.worker_spec(),))
        finally:
            if saved is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = saved
    return mp.get_context("spawn").Pool(num_workers, initializer=_worker_init, initargs=(tok.worker_spec(),))


def _run_chunks(kind: str, paths: Sequence[Path], tok: Tokenizer, num_workers: int, progress: bool, desc: str):
    """Iterate (results, bad) per chunk in file order, over `num_workers` spawned processes."""
    total = sum(os.path.getsize(p) for p in paths)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr, leave=False)
    try:
        if num_workers <= 1 or total < MIN_BYTES_FOR_POOL:
            for chunk, nb in _read_chunks(paths):
                yield _work(kind, chunk, tok)
                if bar is not None:
                    bar.update(nb)
            return
        with _make_pool(num_workers, tok) as pool:
            pending = collections.deque()
            chunks = _read_chunks(paths)
            done = False
            while True:
                while not done and len(pending) < 2 * num_workers:
                    try:
                        chunk, nb = next(chunks)
                    except StopIteration:
                        done = True
                        break
                    pending.append((pool.apply_async(_work_remote, ((kind, chunk),)), nb))
                if not pending:
                    break
                res, nb = pending.popleft()
                yield res.get()
                if bar is not None:
                    bar.update(nb)
    finally:
        if bar is not None:
            bar.close()


class _ShardWriter:
    def __init__(self, out_dir: Path, dtype, with_mask: bool):
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in ("meta.json", "tokens.bin", "mask.bin", "docs.npy"):
            (out_dir / name).unlink(missing_ok=True)
        self.dir, self.dtype = out_dir, dtype
        self.tokens = open(out_dir / "tokens.bin", "wb")
        self.mask = open(out_dir / "mask.bin", "wb") if with_mask else None
        self.lengths: list[int] = []
        self.num_loss = 0

    def add(self, ids: np.ndarray, mask: np.ndarray | None = None):
        self.tokens.write(ids.astype(self.dtype).tobytes())
        if self.mask is not None:
            self.mask.write(mask.astype(np.uint8).tobytes())
            self.num_loss += int(mask.sum())
        self.lengths.append(len(ids))

    def close(self) -> dict:
        self.tokens.close()
        if self.mask is not None:
            self.mask.close()
        docs = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(np.asarray(self.lengths, dtype=np.int64), out=docs[1:])
        np.save(self.dir / "docs.npy", docs)
        st = {"num_tokens": int(docs[-1]), "num_docs": len(self.lengths)}
        if self.mask is not None:
            st["num_loss_tokens"] = self.num_loss
        if self.lengths:
            st["max_doc_len"] = int(max(self.lengths))
            st["mean_doc_len"] = float(docs[-1] / len(self.lengths))
        return st


def _base_meta(kind: str, tok: Tokenizer, paths, dtype) -> dict:
    return {
        "format": "llmcore-shard-v1",
        "kind": kind,
        "dtype": np.dtype(dtype).name,
        "vocab_size": tok.vocab_size,
        "tokenizer_hash": tok.hash,
        "pad_id": tok.pad_id,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "sources": [str(p) for p in paths],
    }


def _write_meta(out_dir: Path, meta: dict) -> None:
    tmp = out_dir / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, out_dir / "meta.json")


def _prepare(kind, jsonl_paths, tok, out_dir, num_workers, strict, progress):
    if isinstance(jsonl_paths, (str, os.PathLike)):
        jsonl_paths = [jsonl_paths]
    paths = [Path(p) for p in jsonl_paths]
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"no such jsonl file: {p}")
    if isinstance(tok, (str, os.PathLike)):
        tok = Tokenizer.load(tok)
    out = Path(out_dir)
    dtype = token_dtype(tok.vocab_size)
    t0 = time.perf_counter()
    if kind == "dpo":
        writers = [_ShardWriter(out / "chosen", dtype, True), _ShardWriter(out / "rejected", dtype, True)]
        (out / "meta.json").unlink(missing_ok=True)
    else:
        writers = [_ShardWriter(out, dtype, kind == "sft")]
    bad_count, bad_examples = 0, []
    for results, bad in _run_chunks(kind, paths, tok, num_workers, progress, f"prep {kind}"):
        if bad:
            if strict:
                for w in writers:
                    w.close()
                raise BadLine(f"{bad[0]}  (--skip-bad skips malformed lines)")
            bad_count += len(bad)
            bad_examples.extend(bad[: max(0, 10 - len(bad_examples))])
        for r in results:
            if kind == "pretrain":
                writers[0].add(r[0])
            elif kind == "sft":
                writers[0].add(r[0], r[1])
            else:
                writers[0].add(r[0], r[1])
                writers[1].add(r[2], r[3])
    stats_parts = [w.close() for w in writers]
    if stats_parts[0]["num_docs"] == 0:
        raise NoData(f"{', '.join(map(str, paths))}: no usable line ({bad_count} malformed"
                     + (f"; first: {bad_examples[0]}" if bad_examples else "") + ")")
    meta = _base_meta(kind, tok, paths, dtype)
    meta["num_bad"] = bad_count
    if kind == "dpo":
        meta["num_pairs"] = stats_parts[0]["num_docs"]
        meta["chosen"], meta["rejected"] = stats_parts
        meta["num_docs"] = meta["num_pairs"]
        meta["num_tokens"] = stats_parts[0]["num_tokens"] + stats_parts[1]["num_tokens"]
        for sub, st in zip(("chosen", "rejected"), stats_parts):
            _write_meta(out / sub, {**_base_meta(kind, tok, paths, dtype), **st, "num_bad": bad_count})
    else:
        meta.update(stats_parts[0])
    meta["seconds"] = round(time.perf_counter() - t0, 3)
    _write_meta(out, meta)
    report_skipped(bad_count, bad_examples, f"{kind} data {', '.join(map(str, paths))}")
    return {**meta, "bad_examples": bad_examples, "out_dir": str(out)}


def prepare_pretrain(jsonl_paths, tokenizer, out_dir, num_workers: int = 2, strict: bool = True,
                     progress: bool = True) -> dict:
    """Tokenize `{"text"}` jsonl files into a packed pretraining shard (see the module docstring).
    `tokenizer` is a Tokenizer or a directory holding one. Returns the stats (= meta.json plus
    "bad_examples" and "out_dir")."""
    return _prepare("pretrain", jsonl_paths, tokenizer, out_dir, num_workers, strict, progress)


def prepare_sft(jsonl_paths, tokenizer, out_dir, num_workers: int = 2, strict: bool = True,
                progress: bool = True) -> dict:
    """Tokenize `{"conversations"}` jsonl files (SFT or reasoning SFT) into tokens + loss mask."""
    return _prepare("sft", jsonl_paths, tokenizer, out_dir, num_workers, strict, progress)


def prepare_dpo(jsonl_paths, tokenizer, out_dir, num_workers: int = 2, strict: bool = True,
                progress: bool = True) -> dict:
    """Tokenize `{"chosen", "rejected"}` jsonl files into out_dir/chosen and out_dir/rejected
    shards (pair i = document i of both); masks cover only the final assistant message."""
    return _prepare("dpo", jsonl_paths, tokenizer, out_dir, num_workers, strict, progress)


PREP_VERSION = 2  # bump when the same inputs would give different shards (re-prepares cached ones)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def source_fingerprint(kind: str, jsonl_paths, tok: Tokenizer, strict: bool = True) -> dict:
    """What a prepared shard depends on: every input file's size and SHA-256 (in order), the
    tokenizer's hash and the prep settings."""
    paths = [Path(p) for p in ([jsonl_paths] if isinstance(jsonl_paths, (str, os.PathLike)) else jsonl_paths)]
    return {"kind": kind, "prep_version": PREP_VERSION, "tokenizer_hash": tok.hash, "skip_bad": not strict,
            "files": [{"name": p.name, "size": p.stat().st_size, "sha256": _sha256(p)} for p in paths]}


def _fingerprint_change(old: dict | None, new: dict) -> str:
    if not old:
        return "it records no source fingerprint (prepared by an older llmcore)"
    if old.get("tokenizer_hash") != new["tokenizer_hash"]:
        return "the tokenizer changed"
    if [f["sha256"] for f in old.get("files", [])] != [f["sha256"] for f in new["files"]]:
        for o, n in zip(old.get("files", []), new["files"]):
            if o.get("sha256") != n["sha256"]:
                return f"input {n['name']} changed (size {o.get('size')} -> {n['size']} bytes, new content hash)"
        return "the list of input files changed"
    return "the prep settings changed"


def prepare_cached(kind: str, jsonl_paths, tokenizer, out_dir, num_workers: int = 2, strict: bool = True,
                   progress: bool = True) -> dict:
    """`prepare_<kind>` into out_dir unless out_dir already holds a shard made from the same input
    bytes, tokenizer and settings (`source_fingerprint`); re-prepares, saying why, otherwise.
    Returns the shard's meta (plus "reused": bool)."""
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = Tokenizer.load(tokenizer)
    paths = [Path(p) for p in ([jsonl_paths] if isinstance(jsonl_paths, (str, os.PathLike)) else jsonl_paths)]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"no such jsonl file: {p}")
    fp = source_fingerprint(kind, paths, tokenizer, strict)
    out = Path(out_dir)
    if (out / "meta.json").exists():
        old = read_meta(out)
        if old.get("fingerprint") == fp:
            return {**old, "reused": True}
        print(f"[llmcore.data.prep] re-preparing {out}: {_fingerprint_change(old.get('fingerprint'), fp)}",
              file=sys.stderr)
    fn = {"pretrain": prepare_pretrain, "sft": prepare_sft, "dpo": prepare_dpo}[kind]
    meta = fn(paths, tokenizer, out, num_workers, strict, progress)
    stored = read_meta(out)
    stored["fingerprint"] = fp
    _write_meta(out, stored)
    return {**meta, "fingerprint": fp, "reused": False}


def read_meta(shard_dir) -> dict:
    path = Path(shard_dir) / "meta.json"
    if not path.exists():
        raise FileNotFoundError(f"{shard_dir} is not a prepared shard (no meta.json); run scripts/prepare_data.py")
    return json.loads(path.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------
# One call for the whole default pipeline
# ----------------------------------------------------------------------------------------------


def prepare_default_data(workdir, seed: int = 0, size: str = "small", vocab_size: int = 6400,
                         num_workers: int = 2, progress: bool = True, force: bool = False) -> dict:
    """Generate the default corpus, train the tokenizer and prepare every shard under `workdir`:

        workdir/corpus/*.jsonl      (write_default_corpus)
        workdir/tokenizer/          (train_tokenizer on pretrain + sft + reason text)
        workdir/pretrain/ sft/ reason/ dpo/ eval_dpo/   (prepared shards)

    Reuses what is already there when the recorded (seed, size, vocab_size) match, unless force.
    Returns {"corpus": {name: path}, "tokenizer": Tokenizer, "tokenizer_dir", "<split>": shard dir,
    "seconds": {...}}.
    """
    from llmcore.data.corpus import CORPUS_VERSION, write_default_corpus
    from llmcore.data.tokenizer import train_tokenizer

    work = Path(workdir)
    stamp = {"seed": seed, "size": size, "vocab_size": vocab_size, "corpus_version": CORPUS_VERSION,
             "format": "llmcore-default-v1"}
    stamp_path = work / "default_data.json"
    if not force and stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp:
        corpus = {p.stem: p for p in sorted((work / "corpus").glob("*.jsonl"))}
        out = {"corpus": corpus, "tokenizer": Tokenizer.load(work / "tokenizer"), "tokenizer_dir": work / "tokenizer"}
        out.update({k: work / k for k in ("pretrain", "sft", "reason", "dpo", "eval_dpo")})
        out["seconds"] = {}
        return out
    stamp_path.unlink(missing_ok=True)
    secs = {}
    t = time.perf_counter()
    corpus = write_default_corpus(work / "corpus", seed=seed, size=size)
    secs["corpus"] = time.perf_counter() - t
    t = time.perf_counter()
    tok = train_tokenizer([corpus["pretrain"], corpus["sft"], corpus["reason"]], vocab_size, work / "tokenizer")
    secs["tokenizer"] = time.perf_counter() - t
    t = time.perf_counter()
    prepare_pretrain([corpus["pretrain"]], tok, work / "pretrain", num_workers, progress=progress)
    prepare_sft([corpus["sft"]], tok, work / "sft", num_workers, progress=progress)
    prepare_sft([corpus["reason"]], tok, work / "reason", num_workers, progress=progress)
    prepare_dpo([corpus["dpo"]], tok, work / "dpo", num_workers, progress=progress)
    prepare_dpo([corpus["eval_dpo"]], tok, work / "eval_dpo", num_workers, progress=progress)
    secs["prep"] = time.perf_counter() - t
    stamp_path.write_text(json.dumps(stamp))
    out = {"corpus": corpus, "tokenizer": tok, "tokenizer_dir": work / "tokenizer"}
    out.update({k: work / k for k in ("pretrain", "sft", "reason", "dpo", "eval_dpo")})
    out["seconds"] = secs
    return out
