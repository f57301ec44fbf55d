"""torch Datasets over prepared shards (llmcore.data.prep), read through numpy memmaps.

Nothing is loaded whole: tokens.bin / mask.bin / docs.npy are memory-mapped, lazily, once per
process (so DataLoader worker processes each open their own maps; pickling a dataset never copies
data).

Every item is a dict of LongTensors of length seq_len:
    input_ids   tokens
    labels      the next token, or -100 where no loss is taken
    positions   position of each token inside its document; 0 at every document start, so
                `cu_seqlens_from_positions` can turn a (B, S) batch into varlen documents
and SFT / DPO items also carry `attention_mask` (1 on real tokens, 0 on padding).

Iteration order: `ResumableBatchSampler` draws epoch e's order as a pure function of
(seed, e) (`dataset.order(epoch)` / `epoch_order`), so a run resumed after `consumed_batches`
batches yields exactly the batches the uninterrupted run would have.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from llmcore.data.prep import read_meta

IGNORE_INDEX = -100


class _Shard:
    """Lazily memory-mapped tokens / mask / docs of one shard directory."""

    def __init__(self, shard_dir, need_mask: bool):
        self.dir = Path(shard_dir)
        self.meta = read_meta(self.dir)
        self.dtype = np.dtype(self.meta["dtype"])
        self.need_mask = need_mask
        if need_mask and not (self.dir / "mask.bin").exists():
            raise FileNotFoundError(f"{self.dir} has no mask.bin: it was not prepared with prepare_sft/prepare_dpo")
        self._pid = None
        self._maps = None

    def _open(self):
        if self._pid != os.getpid():
            n = self.meta["num_tokens"]
            tokens = np.memmap(self.dir / "tokens.bin", dtype=self.dtype, mode="r", shape=(n,)) if n else np.zeros(0, self.dtype)
            mask = None
            if self.need_mask:
                mask = np.memmap(self.dir / "mask.bin", dtype=np.uint8, mode="r", shape=(n,)) if n else np.zeros(0, np.uint8)
            docs = np.load(self.dir / "docs.npy", mmap_mode="r")
            self._maps = (tokens, mask, docs)
            self._pid = os.getpid()
        return self._maps

    @property
    def tokens(self) -> np.ndarray:
        return self._open()[0]

    @property
    def mask(self) -> np.ndarray:
        return self._open()[1]

    @property
    def docs(self) -> np.ndarray:
        return self._open()[2]

    @property
    def num_docs(self) -> int:
        return int(self.meta["num_docs"])

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_pid"], d["_maps"] = None, None
        return d


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The order of items 0..n-1 in `epoch`: a permutation drawn from (seed, epoch) only."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n).astype(np.int64)


class _OrderMixin:
    seed: int = 0

    def order(self, epoch: int, shuffle: bool = True) -> np.ndarray:
        """Item order of `epoch` (pure function of (self.seed, epoch))."""
        return epoch_order(len(self), self.seed, epoch, shuffle)


def _pad_item(ids: np.ndarray, mask: np.ndarray | None, seq_len: int, pad_id: int,
              segments: list[int] | None = None) -> dict:
    """input/labels/positions/attention_mask from up to seq_len+1 tokens of one or several
    concatenated conversations (`segments`: their lengths, default one). Padding: pad_id,
    label -100, positions restarting at 0 (a separate padding segment), attention_mask 0."""
    n = min(len(ids), seq_len + 1)
    ids = ids[:n].astype(np.int64)
    seg = segments if segments is not None else [n]
    inp = np.full(seq_len, pad_id, dtype=np.int64)
    lab = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    att = np.zeros(seq_len, dtype=np.int64)
    m = n - 1  # real input tokens
    inp[:m] = ids[:-1]
    nxt = ids[1:]
    if mask is not None:
        lab[:m] = np.where(mask[1:n].astype(bool), nxt, IGNORE_INDEX)
    else:
        lab[:m] = nxt
    att[:m] = 1
    pos = np.empty(seq_len, dtype=np.int64)
    start = 0
    for length in seg:  # one position run per conversation, over the m real input tokens
        end = min(start + length, m)
        pos[start:end] = np.arange(end - start)
        start = end
    pos[start:] = np.arange(seq_len - start)  # the padding: a segment of its own
    return {"input_ids": torch.from_numpy(inp), "labels": torch.from_numpy(lab),
            "positions": torch.from_numpy(pos), "attention_mask": torch.from_numpy(att)}


class PackedPretrainDataset(_OrderMixin, Dataset):
    """Windows of the packed pretraining stream (a shard from `prepare_pretrain`).

    Item i covers stream tokens [i*seq_len, i*seq_len + seq_len + 1): the windows tile the stream
    without overlap (the last partial window is dropped), and item i is always the same tokens.
    input_ids = the first seq_len, labels = the next token of each (the last seq_len), except -100
    where that next token is the bos starting a new document (a document never predicts the next
    one's first token, as varlen attention could not either); positions restart at 0 at each
    document start inside the window (a window starting mid-document continues its positions).
    `seed` only fixes `order(epoch)`.
    """

    def __init__(self, shard_dir, seq_len: int, seed: int = 0):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.shard = _Shard(shard_dir, need_mask=False)
        self.meta = self.shard.meta
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.num_tokens = int(self.meta["num_tokens"])
        self._len = max(0, (self.num_tokens - 1) // self.seq_len)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict:
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"window {i} out of range [0, {self._len})")
        s = self.seq_len
        t0 = i * s
        chunk = np.asarray(self.shard.tokens[t0:t0 + s + 1], dtype=np.int64)
        docs = self.shard.docs
        idx = np.arange(t0, t0 + s + 1, dtype=np.int64)
        doc_of = np.searchsorted(docs, idx, side="right") - 1
        pos = idx - np.asarray(docs[doc_of], dtype=np.int64)
        labels = chunk[1:].copy()
        labels[pos[1:] == 0] = IGNORE_INDEX
        return {"input_ids": torch.from_numpy(chunk[:-1].copy()), "labels": torch.from_numpy(labels),
                "positions": torch.from_numpy(pos[:-1].copy())}


class SFTDataset(_OrderMixin, Dataset):
    """Conversations from an SFT shard (`prepare_sft`), one per item by default.

    pack=False: item i = conversation i, truncated to seq_len + 1 tokens, right-padded.
    pack=True: conversations are packed greedily, in shard order, into rows of at most
    seq_len + 1 tokens (a conversation longer than that gets a row alone, truncated); positions
    restart at 0 at each conversation, so with `cu_seqlens_from_positions` they never attend to
    each other. The packing plan is fixed at construction (a pure function of the shard).
    labels = next token where the mask of that next token is 1 (assistant content and its
    <|im_end|>), else -100. Padding: pad_id, label -100, attention_mask 0, positions restarting at 0.
    """

    def __init__(self, shard_dir, seq_len: int, pack: bool = False, seed: int = 0):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.shard = _Shard(shard_dir, need_mask=True)
        self.meta = self.shard.meta
        self.seq_len = int(seq_len)
        self.pack = bool(pack)
        self.seed = int(seed)
        self.pad_id = int(self.meta.get("pad_id", 0))
        docs = np.asarray(self.shard.docs)
        if self.pack:
            lengths = np.diff(docs)
            rows, cur, used = [], [], 0
            for d, n in enumerate(lengths.tolist()):
                if cur and used + n > self.seq_len + 1:
                    rows.append((cur[0], len(cur)))
                    cur, used = [], 0
                cur.append(d)
                used += n
            if cur:
                rows.append((cur[0], len(cur)))
            self.rows = np.asarray(rows, dtype=np.int64).reshape(-1, 2)  # (first doc, num docs)
        else:
            self.rows = None

    def __len__(self) -> int:
        return len(self.rows) if self.pack else self.shard.num_docs

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"item {i} out of range [0, {n})")
        docs = self.shard.docs
        if self.pack:
            first, count = (int(x) for x in self.rows[i])
            a, b = int(docs[first]), int(docs[first + count])
            segments = np.diff(np.asarray(docs[first:first + count + 1])).tolist()
        else:
            a, b = int(docs[i]), int(docs[i + 1])
            segments = None
        b = min(b, a + self.seq_len + 1)
        ids = np.asarray(self.shard.tokens[a:b])
        mask = np.asarray(self.shard.mask[a:b])
        return _pad_item(ids, mask, self.seq_len, self.pad_id, segments)


class DPODataset(_OrderMixin, Dataset):
    """Preference pairs from a DPO shard (`prepare_dpo`): item i = pair i.

    Keys chosen_{input_ids, labels, positions, attention_mask} and the same for rejected_, each
    side as one SFTDataset item (truncated to seq_len + 1 tokens, right-padded); labels are -100
    outside the final assistant message (the completion) and its <|im_end|>.
    """

    def __init__(self, shard_dir, seq_len: int, seed: int = 0):
        root = Path(shard_dir)
        self.meta = read_meta(root)
        self.chosen = SFTDataset(root / "chosen", seq_len)
        self.rejected = SFTDataset(root / "rejected", seq_len)
        if len(self.chosen) != len(self.rejected):
            raise ValueError(f"{root}: {len(self.chosen)} chosen vs {len(self.rejected)} rejected documents")
        self.seq_len = int(seq_len)
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.chosen)

    def __getitem__(self, i: int) -> dict:
        out = {}
        for side, ds in (("chosen", self.chosen), ("rejected", self.rejected)):
            for k, v in ds[i].items():
                out[f"{side}_{k}"] = v
        return out


def collate(batch: list[dict]) -> dict:
    """Stack a list of item dicts into a dict of (B, ...) tensors."""
    if not batch:
        raise ValueError("collate got an empty batch")
    return {k: torch.stack([b[k] for b in batch]) for k in batch[0]}


def cu_seqlens_from_positions(positions: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Document boundaries of a (B, S) batch flattened to B*S tokens, for varlen attention.

    A document starts wherever positions == 0 and at the start of every row. Returns
    (cu_seqlens int32 (num_docs + 1,) on positions' device: [0, start_1, ..., B*S], max_seqlen: the
    longest document's length as a Python int).
    """
    if positions.dim() != 2:
        raise ValueError(f"positions must be (B, S), got shape {tuple(positions.shape)}")
    B, S = positions.shape
    starts = positions == 0
    if S:
        starts[:, 0] = True
    idx = torch.nonzero(starts.reshape(-1), as_tuple=False).squeeze(1)
    total = torch.tensor([B * S], device=positions.device, dtype=idx.dtype)
    cu = torch.cat([idx, total]).to(torch.int32)
    max_seqlen = int((cu[1:] - cu[:-1]).max().item()) if cu.numel() > 1 else 0
    return cu, max_seqlen


class ResumableBatchSampler(Sampler):
    """Batches of indices whose order is a pure function of (seed, epoch): epoch e visits
    `epoch_order(n, seed, e)` in slices of batch_size (drop_last drops the partial last batch).

    Global batch b (counting from 0 over all epochs) is always the same indices, so resuming is
    `ResumableBatchSampler(..., start_batch=consumed_batches)` (or `.set_position(...)`).
    epochs=None iterates forever; otherwise stops after `epochs` epochs (len() = total batches).
    """

    def __init__(self, n_or_dataset, batch_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True, start_batch: int = 0, epochs: int | None = None):
        self.n = n_or_dataset if isinstance(n_or_dataset, int) else len(n_or_dataset)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.seed, self.shuffle, self.drop_last = int(batch_size), int(seed), shuffle, drop_last
        self.batches_per_epoch = self.n // self.batch_size if drop_last else -(-self.n // self.batch_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{self.n} items make no full batch of {batch_size}")
        self.epochs = epochs
        self.position = int(start_batch)

    def set_position(self, consumed_batches: int) -> None:
        """Start the next iteration at global batch `consumed_batches`. (Iterating does not move
        the position: a DataLoader prefetches ahead, so the loop counts consumed batches itself.)"""
        self.position = int(consumed_batches)

    def batch(self, b: int) -> list[int]:
        """Indices of global batch b."""
        epoch, k = divmod(int(b), self.batches_per_epoch)
        order = epoch_order(self.n, self.seed, epoch, self.shuffle)
        return order[k * self.batch_size:(k + 1) * self.batch_size].tolist()

    def __iter__(self):
        b = self.position
        order_epoch, order = -1, None
        while self.epochs is None or b < self.epochs * self.batches_per_epoch:
            epoch, k = divmod(b, self.batches_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = epoch_order(self.n, self.seed, epoch, self.shuffle), epoch
            yield order[k * self.batch_size:(k + 1) * self.batch_size].tolist()
            b += 1

    def __len__(self) -> int:
        if self.epochs is None:
            raise TypeError("an endless ResumableBatchSampler (epochs=None) has no length")
        return max(0, self.epochs * self.batches_per_epoch - self.position)
