"""Rotary position embedding (RoPE), half-split ("rotate-half", HF/NeoX/minimind) pair layout.

Rotary(head_dim, max_seq_len, theta) holds fp32 cos/sin tables (max_seq_len, head_dim/2) as
non-persistent buffers (they follow .to(device) and are never saved); forward(q, k, positions)
rotates q (B, S, Hq, D) and k (B, S, Hkv, D) at `positions` (None = 0..S-1, or a (B, S) LongTensor
that may restart per packed document). Tables grow on demand when a position exceeds them.
"""
import torch
import torch.nn as nn

from llmcore.nn._pending_ops import rope, rope_cache  # TODO(merge rope_swiglu): from llmcore.ops import rope, rope_cache


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
    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 1e6, backend: str = "llmcore"):
        super().__init__()
        self.head_dim, self.theta, self.backend = head_dim, theta, backend
        cos, sin = rope_cache(max_seq_len, head_dim, theta=theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def ensure(self, max_pos: int):
        """Grow the tables to cover positions < max_pos (generation beyond max_seq_len)."""
        if max_pos > self.cos.shape[0]:
            n = max(max_pos, 2 * self.cos.shape[0])
            self.cos, self.sin = rope_cache(n, self.head_dim, theta=self.theta, device=self.cos.device)

    def forward(self, q, k, positions=None):
        if self.backend == "llmcore":
            return rope(q, k, self.cos, self.sin, positions=positions, interleaved=False)
        return rope_torch(q, k, self.cos, self.sin, positions)
