"""Rotary position embedding (RoPE), half-split ("rotate-half", HF/NeoX/minimind) pair layout.

Rotary(head_dim, max_seq_len, theta, scaling=None) holds fp32 cos/sin tables (max_seq_len,
head_dim/2) as non-persistent buffers (they follow .to(device) and are never saved); forward(q, k,
positions) rotates q (B, S, Hq, D) and k (B, S, Hkv, D) at `positions` (None = 0..S-1, or a (B, S)
LongTensor that may restart per packed document). Tables grow on demand when a position exceeds them.

`scaling`: transformers' rope_parameters beyond theta (rope_type linear / dynamic / yarn / llama3),
frequencies from llmcore.ops.rope_frequencies. "dynamic" is stateful exactly as transformers'
`dynamic_rope_update`: each forward calls `ensure(L)` with its length L (max position + 1); when L
exceeds the longest length seen, the frequencies are recomputed for L; when L drops below the
trained length after having exceeded it, they are reset to the original ones.
"""
import torch
import torch.nn as nn

from llmcore.ops import rope, rope_cache, rope_frequencies


def rope_torch(q, k, cos, sin, positions=None):
    """Plain PyTorch RoPE (the torch backend): x*cos + rotate_half(x)*sin in fp32."""
    S = q.shape[1]
    if positions is None:
        c, s = cos[:S][None, :, None, :], sin[:S][None, :, None, :]
    else:
        c, s = cos[positions][:, :, None, :], sin[positions][:, :, None, :]
    c, s = torch.cat((c, c), -1), torch.cat((s, s), -1)

    def rot(x):
        xf = x.float()
        x1, x2 = xf.chunk(2, -1)
        return (xf * c + torch.cat((-x2, x1), -1) * s).to(x.dtype)

    return rot(q), rot(k)


class Rotary(nn.Module):
    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 1e6, backend: str = "llmcore",
                 scaling: dict | None = None):
        super().__init__()
        self.head_dim, self.theta, self.backend, self.scaling = head_dim, theta, backend, scaling or None
        self.dynamic = bool(self.scaling) and self.scaling.get("rope_type") == "dynamic"
        self.trained_len = int(self.scaling["max_position_embeddings"]) if self.dynamic else 0
        self.seen_len = self.trained_len  # transformers' max_seq_len_cached
        cos, sin = self._tables(max(max_seq_len, self.trained_len), None, None)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, n: int, seq_len, device):
        inv_freq, att = rope_frequencies(self.head_dim, self.theta, self.scaling, seq_len=seq_len, device=device)
        return rope_cache(n, self.head_dim, theta=self.theta, device=device, inv_freq=inv_freq, attention_scaling=att)

    def ensure(self, max_pos: int):
        """Cover positions < max_pos (generation beyond max_seq_len); for dynamic scaling also
        follow transformers' per-forward frequency update for a forward of length max_pos."""
        dev = self.cos.device
        if self.dynamic:
            if max_pos > self.seen_len:  # growth: frequencies for this length
                self.seen_len = max_pos
                self.cos, self.sin = self._tables(max(max_pos, self.cos.shape[0]), max_pos, dev)
                return
            if max_pos < self.trained_len < self.seen_len:  # back inside the trained length: reset
                self.seen_len = self.trained_len
                self.cos, self.sin = self._tables(self.cos.shape[0], None, dev)
        if max_pos > self.cos.shape[0]:
            n = max(max_pos, 2 * self.cos.shape[0])
            self.cos, self.sin = self._tables(n, self.seen_len if self.dynamic else None, dev)

    def forward(self, q, k, positions=None):
        if self.backend == "llmcore":
            return rope(q, k, self.cos, self.sin, positions=positions, interleaved=False)
        return rope_torch(q, k, self.cos, self.sin, positions)
