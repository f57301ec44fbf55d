"""Flash attention: forward, backward, variable-length (packed) sequences and KV-cache decoding.

    flash_attn(q, k, v, causal=True, softmax_scale=None, return_lse=False)
    flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True, ...)
    flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new=None, v_new=None, causal=True, ...)

Shapes: q (B, Sq, Hq, D); k, v (B, Sk, Hkv, D) with Hq % Hkv == 0 (GQA / MQA: q head h reads kv
head h // (Hq // Hkv), k/v are never repeated). Varlen: q (total_q, Hq, D), k/v (total_k, Hkv, D)
with int32 cu_seqlens (B + 1,) prefix sums; sequence b owns rows [cu[b], cu[b + 1]) and never sees
another's keys. Inputs may be strided views (e.g. slices of a fused qkv projection) as long as D
has unit stride (otherwise they are copied); outputs are contiguous.
Dtypes: CPU float32 / bfloat16 / float16 (float64 for gradcheck), any D <= 256; CUDA float16 /
bfloat16 with D in {64, 96, 128} (other D: a clear error; `flash_attn_reference` is the fallback).
Math: out = softmax(scale * q k^T) v with scale = softmax_scale or 1/sqrt(D). Causal masking is
aligned bottom-right as in FlashAttention >= 2.1: query i (of Sq) sees keys j <= i + Sk - Sq, so a
decode step against a cache needs no special case (PyTorch SDPA's is_causal is top-left; the two
agree when Sq == Sk).
Fully masked rows (no visible key: causal with Sq > Sk, an empty sequence, an empty cache) give
out = 0 and lse = -inf, never NaN; their gradients are 0. The reference does the same.
NaN propagates: a NaN in q makes its row's out and lse NaN, a NaN in k every row that sees that
key, a NaN in v the outputs of the rows that see it (lse untouched); the backward then gives NaN
dq for those rows and NaN dk / dv for the keys they see (math SDPA does the same; masked keys
stay masked, so a NaN key does not reach rows that cannot see it).
lse: logsumexp of the scaled scores in natural log, fp32 (fp64 for float64), (B, Hq, Sq) or
(Hq, total_q) for varlen; it is returned for inspection / merging and is not differentiable.
Numerics: scores, softmax statistics and P V accumulate in fp32 (online softmax over key blocks);
out is rounded once to q's dtype. Backward recomputes P from lse (FlashAttention-2: no S x S
matrix is stored) with fp32 accumulation of dq / dk / dv and is deterministic on CPU (a fixed
split of the key blocks and a fixed-order dQ reduction) and on CUDA (see flash_attn_bwd_cuda.cu).
"""
import math

import torch

from llmcore.ops._lib import ops, use_reference


def _acc(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _scale(softmax_scale, q):
    if q.shape[-1] == 0:  # before 1/sqrt(D); the ATen layer says the same for an explicit scale
        raise ValueError(f"flash_attn: argument 'q' must have head_dim > 0, got shape {list(q.shape)}")
    return float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])


def _attention_bhsd(qf, kf, vf, causal, scale):
    """fp32 attention on (B, H, S, D) tensors; returns out (B, H, Sq, D) and lse (B, H, Sq)."""
    sq, sk = qf.shape[-2], kf.shape[-2]
    s = (qf @ kf.transpose(-1, -2)) * scale
    if causal:
        i = torch.arange(sq, device=qf.device)[:, None]
        j = torch.arange(sk, device=qf.device)[None, :]
        s = s.masked_fill(j > i + (sk - sq), float("-inf"))
    m = s.amax(-1, keepdim=True).detach() if sk > 0 else s.new_zeros(s.shape[:-1] + (1,))
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # fully masked rows: shift by 0
    e = torch.exp(s - m)
    l = e.sum(-1, keepdim=True)
    p = e / torch.where(l > 0, l, torch.ones_like(l))
    return p @ vf, (m + torch.log(l)).squeeze(-1)


def flash_attn_reference(q, k, v, causal=True, softmax_scale=None, return_lse=False):
    """fp32 reference of flash_attn (same signature): the plain S = q k^T, masked softmax, P v."""
    acc = _acc(q)
    hq, hkv = q.shape[2], k.shape[2]
    qf = q.to(acc).transpose(1, 2)                                        # (B, Hq, Sq, D)
    kf = k.to(acc).transpose(1, 2).repeat_interleave(hq // hkv, dim=1)    # (B, Hq, Sk, D)
    vf = v.to(acc).transpose(1, 2).repeat_interleave(hq // hkv, dim=1)
    out, lse = _attention_bhsd(qf, kf, vf, causal, _scale(softmax_scale, q))
    out = out.transpose(1, 2).to(q.dtype)
    return (out, lse) if return_lse else out


def flash_attn_varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True,
                                softmax_scale=None, return_lse=False):
    """fp32 reference of flash_attn_varlen: flash_attn_reference on each packed sequence."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(cq) - 1):
        o, l = flash_attn_reference(q[None, cq[b]:cq[b + 1]], k[None, ck[b]:ck[b + 1]], v[None, ck[b]:ck[b + 1]],
                                    causal, softmax_scale, return_lse=True)
        outs.append(o[0])
        lses.append(l[0])
    tail = q.shape[0] - (cq[-1] if cq else 0)  # rows after the last sequence: out 0, lse -inf
    outs.append(q.new_zeros((tail,) + tuple(q.shape[1:])))
    lses.append(torch.full((q.shape[1], tail), float("-inf"), dtype=_acc(q), device=q.device))
    out, lse = torch.cat(outs), torch.cat(lses, dim=1)
    return (out, lse) if return_lse else out


def flash_attn_with_kvcache_reference(q, k_cache, v_cache, cache_seqlens, k_new=None, v_new=None, causal=True,
                                      softmax_scale=None, return_lse=False):
    """Reference of flash_attn_with_kvcache: appends in place, then flash_attn_reference per sequence."""
    s_new = 0 if k_new is None else k_new.shape[1]
    lens = cache_seqlens.tolist()
    outs, lses = [], []
    for b, n in enumerate(lens):
        if s_new:
            k_cache[b, n:n + s_new] = k_new[b]
            v_cache[b, n:n + s_new] = v_new[b]
        o, l = flash_attn_reference(q[b:b + 1], k_cache[b:b + 1, :n + s_new], v_cache[b:b + 1, :n + s_new], causal,
                                    softmax_scale, return_lse=True)
        outs.append(o)
        lses.append(l)
    out = torch.cat(outs) if outs else q.new_empty(q.shape)
    lse = torch.cat(lses) if lses else q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=_acc(q))
    return (out, lse) if return_lse else out


def flash_attn(q, k, v, causal=True, softmax_scale=None, return_lse=False):
    """Attention of q (B, Sq, Hq, D) over k, v (B, Sk, Hkv, D). Returns out (B, Sq, Hq, D) in q's
    dtype, and lse (B, Hq, Sq) fp32 when return_lse. See the module docstring."""
    if use_reference("flash_attn", q):
        return flash_attn_reference(q, k, v, causal, softmax_scale, return_lse)
    out, lse = ops.flash_attn_fwd(q, k, v, _scale(softmax_scale, q), causal)
    return (out, lse) if return_lse else out


def flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True,
                      softmax_scale=None, return_lse=False):
    """Attention over packed sequences: q (total_q, Hq, D), k/v (total_k, Hkv, D), int32 cu_seqlens
    (B + 1,), max_seqlen_* the longest sequence. Returns out (total_q, Hq, D) and lse (Hq, total_q)."""
    if use_reference("flash_attn_varlen", q):
        return flash_attn_varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                           softmax_scale, return_lse)
    out, lse = ops.flash_attn_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                                         _scale(softmax_scale, q), causal)
    return (out, lse) if return_lse else out


def flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new=None, v_new=None, causal=True,
                            softmax_scale=None, return_lse=False):
    """Decode / chunked prefill against a KV cache (inference only, no autograd: with grad mode on,
    an input that requires grad is an error up front, nothing appended; use flash_attn to train).

    k_cache, v_cache: (B, S_max, Hkv, D), unit stride in D; cache_seqlens: int32 (B,), the number
    of valid cached tokens before this call (not modified: the caller advances it). k_new, v_new:
    (B, S_new, Hkv, D) or None, written in place at positions cache_seqlens[b] .. + S_new (an error
    on CPU if that overflows S_max; on CUDA out-of-range rows are skipped, not written).
    q: (B, Sq, Hq, D) (Sq == S_new when appending) attends, causally and bottom-right aligned, over
    the first cache_seqlens[b] + S_new keys. On CUDA, short q (decode) is split along the cache
    (flash-decoding) so that one sequence still fills the GPU. Returns out (B, Sq, Hq, D) [, lse].
    """
    if use_reference("flash_attn_with_kvcache", q):
        return flash_attn_with_kvcache_reference(q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal,
                                                 softmax_scale, return_lse)
    out, lse = ops.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new,
                                           _scale(softmax_scale, q), causal)
    return (out, lse) if return_lse else out


@torch.library.register_fake("llmcore::flash_attn_fwd")
def _fwd_fake(q, k, v, softmax_scale, causal):
    b, sq, hq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, hq, sq), dtype=_acc(q))


@torch.library.register_fake("llmcore::flash_attn_bwd")
def _bwd_fake(dout, q, k, v, out, lse, softmax_scale, causal):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.register_fake("llmcore::flash_attn_varlen_fwd")
def _varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=_acc(q))


@torch.library.register_fake("llmcore::flash_attn_varlen_bwd")
def _varlen_bwd_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     softmax_scale, causal):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.register_fake("llmcore::flash_attn_with_kvcache")
def _kvcache_fake(q, k_cache, v_cache, cache_seqlens, k_new, v_new, softmax_scale, causal):
    b, sq, hq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, hq, sq), dtype=_acc(q))


def _fwd_setup(ctx, inputs, output):
    q, k, v, scale, causal = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale, ctx.causal = scale, causal


def _fwd_backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = ops.flash_attn_bwd(dout, q, k, v, out, lse, ctx.scale, ctx.causal)
    return dq, dk, dv, None, None


def _varlen_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, causal = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.args = (max_q, max_k, scale, causal)


def _varlen_backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = ops.flash_attn_varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


torch.library.register_autograd("llmcore::flash_attn_fwd", _fwd_backward, setup_context=_fwd_setup)
torch.library.register_autograd("llmcore::flash_attn_varlen_fwd", _varlen_backward, setup_context=_varlen_setup)
