"""Grouped-query causal self-attention with RoPE and three execution paths.

    dense    x (B, S, dim), positions None or without restarts   -> flash_attn
    packed   positions restart inside a row (packed documents)    -> flash_attn_varlen on cu_seqlens,
                                                                     so no token attends across documents
    cached   a KV cache (k_cache, v_cache (B, S_max, Hkv, D), cache_seqlens int32 (B,))
                                                                  -> flash_attn_with_kvcache (prefill/decode)

backend "torch" is plain PyTorch (manual RoPE, F.scaled_dot_product_attention with enable_gqa and
an explicit boolean mask for the packed/cached paths) — the comparison baseline. Projections are
nn.Linear (wq, wk, wv, wo), bias-free unless `bias` (q/k/v, Qwen2) / `out_bias` (o); head_dim may
differ from dim / n_heads (Qwen3). `qk_norm`: RMSNorm over head_dim on every q and k head (weights
q_norm.weight, k_norm.weight, shared by the heads), before RoPE, as Qwen3 and minimind-3 do; on
the llmcore backend norm and RoPE run as one fused op (llmcore.ops.qk_norm_rope). Under
autocast q/k/v are 16-bit and attention runs in that dtype with fp32 softmax statistics.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmcore.ops import flash_attn, flash_attn_varlen, flash_attn_with_kvcache, qk_norm_rope


@dataclass
class AttnMeta:
    """Per-forward attention inputs shared by every layer (built once by the model)."""
    positions: Optional[torch.Tensor] = None      # (B, S) long, rope positions; None = 0..S-1
    cu_seqlens: Optional[torch.Tensor] = None     # (n_docs + 1,) int32 over the flattened B*S tokens
    max_seqlen: int = 0
    doc_mask: Optional[torch.Tensor] = None       # (B, 1, S, S) bool, torch backend's packed mask
    cache_seqlens: Optional[torch.Tensor] = None  # (B,) int32 valid cached tokens before this call


def sdpa_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new):
    """torch backend twin of flash_attn_with_kvcache (writes k_new/v_new into the cache, causal)."""
    B, Sq = q.shape[:2]
    lens = cache_seqlens.long()
    idx = lens[:, None] + torch.arange(Sq, device=q.device)[None, :]
    b = torch.arange(B, device=q.device)[:, None].expand_as(idx)
    k_cache[b, idx] = k_new.to(k_cache.dtype)
    v_cache[b, idx] = v_new.to(v_cache.dtype)
    total = lens + Sq
    sk = int(total.max())
    j = torch.arange(sk, device=q.device)[None, None, :]
    i = torch.arange(Sq, device=q.device)[None, :, None]
    mask = (j < total[:, None, None]) & (j <= i + (total[:, None, None] - Sq))
    return sdpa(q, k_cache[:, :sk], v_cache[:, :sk], mask[:, None])


def sdpa(q, k, v, mask=None, causal=False):
    """q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) -> (B, Sq, Hq, D) via F.scaled_dot_product_attention."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         is_causal=causal and mask is None, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, backend: str = "llmcore", head_dim: int = 0,
                 bias: bool = False, out_bias: bool = False, qk_norm: bool = False, norm_eps: float = 1e-6):
        super().__init__()
        head_dim = head_dim or dim // n_heads
        assert n_heads % n_kv_heads == 0, "n_heads % n_kv_heads must be 0"
        self.n_heads, self.n_kv_heads, self.head_dim, self.backend = n_heads, n_kv_heads, head_dim, backend
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=bias)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=out_bias)
        if qk_norm:
            from llmcore.nn.norm import RMSNorm

            self.q_norm, self.k_norm = RMSNorm(head_dim, norm_eps, backend), RMSNorm(head_dim, norm_eps, backend)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, rotary, meta: AttnMeta, kv_cache=None):
        B, S, _ = x.shape
        q = self.wq(x).view(B, S, self.n_heads, self.head_dim)     # (B, S, Hq, D)
        k = self.wk(x).view(B, S, self.n_kv_heads, self.head_dim)  # (B, S, Hkv, D)
        v = self.wv(x).view(B, S, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None and self.backend == "llmcore" and rotary.backend == "llmcore":
            # one fused pass: per-head RMSNorm of q and k, then RoPE (rotary's tables, half-split)
            q, k = qk_norm_rope(q, k, self.q_norm.weight, self.k_norm.weight, rotary.cos, rotary.sin,
                                self.q_norm.eps, positions=meta.positions, interleaved=False)
        else:
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = rotary(q, k, meta.positions)
        torch_backend = self.backend == "torch"
        if kv_cache is not None:
            k_cache, v_cache = kv_cache
            if torch_backend:
                o = sdpa_with_kvcache(q, k_cache, v_cache, meta.cache_seqlens, k, v)
            else:
                o = flash_attn_with_kvcache(q, k_cache, v_cache, meta.cache_seqlens, k_new=k, v_new=v, causal=True)
        elif meta.cu_seqlens is not None:
            if torch_backend:
                o = sdpa(q, k, v, meta.doc_mask)
            else:
                o = flash_attn_varlen(q.reshape(B * S, self.n_heads, self.head_dim),
                                      k.reshape(B * S, self.n_kv_heads, self.head_dim),
                                      v.reshape(B * S, self.n_kv_heads, self.head_dim),
                                      meta.cu_seqlens, meta.cu_seqlens, meta.max_seqlen, meta.max_seqlen,
                                      causal=True).view(B, S, self.n_heads, self.head_dim)
        else:
            o = sdpa(q, k, v, causal=True) if torch_backend else flash_attn(q, k, v, causal=True)
        return self.wo(o.reshape(B, S, self.n_heads * self.head_dim))
