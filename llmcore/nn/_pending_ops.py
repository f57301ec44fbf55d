"""TEMPORARY pure-PyTorch stand-ins for llmcore ops that have not landed on this branch yet.

Each function here has exactly the signature of the llmcore.ops function (or llmcore.nn module)
being written on another branch, so that switching to the kernel is a one-line import change
in llmcore/nn/*.py (and the lead deletes this file when the branches merge):

    rope_cache, rope                  -> llmcore.ops (branch rope_swiglu)
    swiglu, swiglu_packed             -> llmcore.ops (branch rope_swiglu)
    flash_attn, flash_attn_varlen,
    flash_attn_with_kvcache           -> llmcore.ops (branch flash_attn)
    MoEFeedForward                    -> llmcore.nn   (branch moe)
    cu_seqlens_from_positions         -> llmcore.data.datasets (branch data)

Numerics: plain fp32 math where cheap (rope, softmax statistics inside SDPA), outputs in the input
dtype. They are correct but not fast; nothing here is a kernel.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---- rope (branch rope_swiglu) ----
def rope_cache(max_seq_len, head_dim, theta=1e6, device=None, scaling=None):
    """cos, sin tables, fp32 (max_seq_len, head_dim // 2): angle[p, i] = p * theta ** (-2i / D)."""
    if scaling is not None:
        raise NotImplementedError("rope scaling is not supported by the stand-in")
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    ang = torch.arange(max_seq_len, dtype=torch.float64, device=device)[:, None] * inv[None, :]
    return ang.cos().float(), ang.sin().float()


def rope(q, k, cos, sin, positions=None, interleaved=False):
    """Rotate q (B, S, Hq, D) and k (B, S, Hk, D); positions None (0..S-1), an int offset, or (B, S)."""
    B, S = q.shape[:2]
    if positions is None:
        c, s = cos[:S][None, :, None, :], sin[:S][None, :, None, :]
    elif isinstance(positions, int):
        c, s = cos[positions:positions + S][None, :, None, :], sin[positions:positions + S][None, :, None, :]
    else:
        c, s = cos[positions][:, :, None, :], sin[positions][:, :, None, :]

    def rot(x):
        xf = x.float()
        if interleaved:
            x1, x2 = xf[..., 0::2], xf[..., 1::2]
            return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), -1).flatten(-2).to(x.dtype)
        x1, x2 = xf.chunk(2, -1)
        return torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), -1).to(x.dtype)

    return rot(q), rot(k)


# ---- swiglu (branch rope_swiglu) ----
def swiglu(gate, up):
    """silu(gate) * up, computed in fp32, output in gate's dtype."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def swiglu_packed(gate_up):
    """gate_up (..., 2F) = [gate | up] -> silu(gate) * up (..., F)."""
    g, u = gate_up.chunk(2, -1)
    return swiglu(g, u)


# ---- flash attention (branch flash_attn) ----
def _sdpa(q, k, v, mask, softmax_scale):
    # q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D), mask bool (B or 1, 1, Sq, Sk) or None
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         scale=softmax_scale, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def _causal_mask(sq, sk, device):
    # bottom-right aligned: query i sees keys j <= i + (sk - sq)
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    return j <= i + (sk - sq)


def flash_attn(q, k, v, causal=True, softmax_scale=None, return_lse=False):
    """Attention over q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D); causal aligned bottom-right."""
    mask = _causal_mask(q.shape[1], k.shape[1], q.device)[None, None] if causal else None
    if causal and q.shape[1] == k.shape[1]:  # square causal: let SDPA pick its fused causal path
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                             scale=softmax_scale, enable_gqa=q.shape[2] != k.shape[2]).transpose(1, 2)
    else:
        out = _sdpa(q, k, v, mask, softmax_scale)
    if return_lse:
        scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
        rep = q.shape[2] // k.shape[2]
        s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float().repeat_interleave(rep, 2)) * scale
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        return out, torch.logsumexp(s, -1)
    return out


def flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True):
    """Attention within each sequence of a packed batch: q (total_q, Hq, D), k/v (total_k, Hkv, D).
    Stand-in: the sequences are gathered into a padded (n, max_seqlen, H, D) batch for one SDPA call."""
    n = cu_seqlens_q.numel() - 1

    def pad(x, cu, max_len):
        lens = (cu[1:] - cu[:-1]).long()
        j = torch.arange(max_len, device=x.device)
        valid = j[None, :] < lens[:, None]                              # (n, max_len)
        idx = (cu[:-1].long()[:, None] + j[None, :]).clamp(max=max(x.shape[0] - 1, 0))
        return x[idx], valid                                            # (n, max_len, H, D)

    qp, qvalid = pad(q, cu_seqlens_q, max_seqlen_q)
    kp, kvalid = pad(k, cu_seqlens_k, max_seqlen_k)
    vp, _ = pad(v, cu_seqlens_k, max_seqlen_k)
    mask = kvalid[:, None, None, :]                                     # (n, 1, 1, Sk)
    if causal:  # bottom-right aligned per sequence
        lq = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()[:, None, None, None]
        lk = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()[:, None, None, None]
        i = torch.arange(max_seqlen_q, device=q.device)[None, None, :, None]
        jj = torch.arange(max_seqlen_k, device=q.device)[None, None, None, :]
        mask = mask & (jj <= i + (lk - lq))
    mask = mask | ~qvalid[:, None, :, None]  # padded query rows: any finite row, dropped below
    out = _sdpa(qp, kp, vp, mask, None)                                 # (n, max_len, Hq, D)
    return out[qvalid]                                                  # (total_q, Hq, D)


def flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new=None, v_new=None, causal=True, softmax_scale=None):
    """Decode/prefill attention against a KV cache (B, S_max, Hkv, D). k_new/v_new (B, Sn, Hkv, D) are
    written in place at cache_seqlens[b].. first; each row then attends to its cache_seqlens[b] + Sn
    valid keys, causal aligned bottom-right. cache_seqlens (int32, (B,)) is not modified."""
    B, Sq = q.shape[:2]
    lens = cache_seqlens.long()
    if k_new is not None:
        Sn = k_new.shape[1]
        idx = lens[:, None] + torch.arange(Sn, device=q.device)[None, :]  # (B, Sn)
        b = torch.arange(B, device=q.device)[:, None].expand_as(idx)
        k_cache[b, idx] = k_new.to(k_cache.dtype)
        v_cache[b, idx] = v_new.to(v_cache.dtype)
        total = lens + Sn
    else:
        total = lens
    sk = int(total.max())
    j = torch.arange(sk, device=q.device)[None, None, :]  # key index
    i = torch.arange(Sq, device=q.device)[None, :, None]  # query index
    valid = j < total[:, None, None]
    if causal:
        valid = valid & (j <= i + (total[:, None, None] - Sq))
    return _sdpa(q, k_cache[:, :sk], v_cache[:, :sk], valid[:, None], softmax_scale)


# ---- MoE (branch moe) ----
class MoEFeedForward(nn.Module):
    """Stand-in for llmcore.nn.MoEFeedForward: routed SwiGLU experts (top-k of a softmax/sigmoid router,
    renormalized) plus always-on shared experts. Exposes .aux_loss (Switch-style, times aux_loss_coef,
    when balance="aux") and .update_bias(gamma) (DeepSeek-V3 aux-free balancing, when balance="bias")."""

    def __init__(self, hidden, ffn_hidden, num_experts, top_k, num_shared_experts=0, score="softmax",
                 aux_loss_coef=0.01, balance="aux"):
        super().__init__()
        self.num_experts, self.top_k, self.score, self.balance = num_experts, top_k, score, balance
        self.aux_loss_coef = aux_loss_coef
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(_SwiGLU(hidden, ffn_hidden) for _ in range(num_experts))
        self.shared_experts = nn.ModuleList(_SwiGLU(hidden, ffn_hidden) for _ in range(num_shared_experts))
        self.register_buffer("bias", torch.zeros(num_experts), persistent=True)
        self.register_buffer("_load", torch.zeros(num_experts), persistent=False)
        self.aux_loss = torch.zeros(())

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router(x).float()
        probs = logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()
        sel = probs + self.bias if self.balance == "bias" else probs
        idx = sel.topk(self.top_k, -1).indices
        w = probs.gather(-1, idx)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            if tok.numel():
                out.index_add_(0, tok, (expert(x[tok]) * w[tok, slot, None]).to(x.dtype))
        for expert in self.shared_experts:
            out = out + expert(x)
        counts = torch.bincount(idx.flatten(), minlength=self.num_experts).float()
        if self.training:
            self._load += counts.detach()
        if self.balance == "aux" and self.training:
            f = counts / idx.numel() * self.num_experts
            self.aux_loss = self.aux_loss_coef * (f * probs.mean(0)).sum()
        else:
            self.aux_loss = torch.zeros((), device=x.device)
        return out.reshape(shape)

    @torch.no_grad()
    def update_bias(self, gamma):
        load = self._load
        self.bias += gamma * torch.sign(load.mean() - load)
        self._load.zero_()


class _SwiGLU(nn.Module):
    def __init__(self, hidden, ffn_hidden):
        super().__init__()
        self.w_gate = nn.Linear(hidden, ffn_hidden, bias=False)
        self.w_up = nn.Linear(hidden, ffn_hidden, bias=False)
        self.w_down = nn.Linear(ffn_hidden, hidden, bias=False)

    def forward(self, x):
        return self.w_down(swiglu(self.w_gate(x), self.w_up(x)))


# ---- packed-sequence boundaries (branch data) ----
def cu_seqlens_from_positions(positions):
    """positions (B, S), restarting at 0 at each document start -> (cu_seqlens int32 (n+1,), max_seqlen).
    Every row start is also a boundary (a row may begin mid-document)."""
    B, S = positions.shape
    start = positions == 0
    start[:, 0] = True
    idx = start.flatten().nonzero().flatten()
    cu = torch.cat((idx, idx.new_tensor([B * S]))).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())
