"""Rotary position embedding (RoPE): the cos/sin tables and the rotation of q and k.

    cos, sin = rope_cache(max_seq_len, head_dim, theta=1e6)        # fp32 (max_seq_len, head_dim // 2)
    q, k = rope(q, k, cos, sin, positions=None, interleaved=False)  # new tensors
    rope_(q, k, cos, sin, ...)                                      # in place, inference only

Shapes: q (B, S, Hq, D), k (B, S, Hkv, D), any Hkv (GQA: Hkv <= Hq), any even D. q and k may be
strided views (e.g. slices of one fused qkv projection output): any strides for B, S, H are read in
place; a strided last dim is copied (rope) or rejected (rope_). Outputs of `rope` are contiguous.
Dtypes: q, k float32 / float16 / bfloat16 (float64 on CPU), same dtype; cos/sin float32.
Positions: None -> 0..S-1; an int o -> o..o+S-1 (KV-cache decoding); a (B, S) or (1, S) int32/int64
tensor -> per-token positions (packed documents restarting at 0). Every position must lie in
[0, max_seq_len): checked with a clear error for the int forms on every device and for the tensor
form on CPU; on CUDA a tensor position out of range cannot raise without a device synchronization,
so that token's outputs are NaN (never an out-of-bounds read).
Layout: interleaved=False rotates halves (x[i], x[i + D/2]) — HF `rotate_half`, NeoX, minimind's
current model; interleaved=True rotates adjacent pairs (x[2i], x[2i+1]) — Meta Llama's complex form.
Math per pair, angle a = pos * inv_freq[i]: y1 = x1 cos a - x2 sin a; y2 = x2 cos a + x1 sin a.
Numerics: fp32 math (fp64 for float64), one rounding to q's dtype. Backward is the inverse rotation
(sin -> -sin) of the incoming gradients; cos/sin are constants (no gradient flows to them).
"""
import math
import numbers

import torch

from llmcore.ops._lib import ops, use_reference

__all__ = ["rope_cache", "rope_frequencies", "rope", "rope_", "rope_reference"]

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


def _yarn_params(scaling):
    """(factor, original_max_position, beta_fast, beta_slow, attention_factor) from a dict (HF /
    minimind keys) or a (factor, original_max_position) tuple."""
    if isinstance(scaling, dict):
        kind = scaling.get("rope_type", scaling.get("type", "yarn"))
        if kind != "yarn":
            raise ValueError(f"rope_cache: only YaRN scaling is supported, got type {kind!r}")
        orig = scaling.get("original_max_position_embeddings", scaling.get("original_max_position", 2048))
        return (float(scaling.get("factor", 16.0)), int(orig), float(scaling.get("beta_fast", 32.0)),
                float(scaling.get("beta_slow", 1.0)), float(scaling.get("attention_factor", 1.0)))
    factor, orig = scaling
    return float(factor), int(orig), 32.0, 1.0, 1.0


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None, seq_len: int | None = None,
                     device=None):
    """(inv_freq fp32 (head_dim // 2,), attention_scaling) exactly as transformers'
    ROPE_INIT_FUNCTIONS compute them (modeling_rope_utils, transformers 4.45-5.x) for
    scaling["rope_type"] in ROPE_TYPES (None / "default": inv_freq[i] = theta ** (-2i / head_dim)):

    linear   inv_freq / factor
    dynamic  NTK-aware: theta *= (factor * L / M - (factor - 1)) ** (D / (D - 2)) with L = max(seq_len,
             M), M = scaling["max_position_embeddings"] (the model's trained length); seq_len is the
             length of the current forward (transformers recomputes per forward, see Rotary)
    yarn     ramp between extrapolated and interpolated (/ factor) frequencies over the dims whose
             wavelength turns beta_fast (32) .. beta_slow (1) times in original_max_position_embeddings
             (floor/ceil unless truncate=False); attention_scaling = attention_factor, else
             mscale(factor, mscale) / mscale(factor, mscale_all_dim), else 0.1 ln(factor) + 1
    llama3   wavelengths above original / low_freq_factor divided by factor, below original /
             high_freq_factor kept, smoothly interpolated in between
    """
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default")) or "default"
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_frequencies: rope_type must be one of {ROPE_TYPES}, got {kind!r}")
    sc = scaling or {}
    dim = head_dim
    arange = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float()
    if kind == "dynamic":
        factor, M = float(sc["factor"]), int(sc["max_position_embeddings"])
        L = max(int(seq_len or M), M)
        theta = theta * ((factor * L / M) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (theta ** (arange / dim))
    if kind == "linear":
        return inv_freq / float(sc["factor"]), 1.0
    if kind == "llama3":
        factor, lo, hi = float(sc["factor"]), float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
        old = float(sc["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        inv_l = torch.where(wavelen > old / lo, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        medium = ~(wavelen < old / hi) * ~(wavelen > old / lo)
        return torch.where(medium, smoothed, inv_l), 1.0
    if kind == "yarn":
        orig = int(sc["original_max_position_embeddings"])
        factor = sc.get("factor") or sc["max_position_embeddings"] / orig

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        att = sc.get("attention_factor")
        if att is None:
            m, m_all = sc.get("mscale"), sc.get("mscale_all_dim")
            att = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
        beta_fast, beta_slow = sc.get("beta_fast") or 32, sc.get("beta_slow") or 1

        def corr_dim(rot):
            return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(theta))

        low, high = corr_dim(beta_fast), corr_dim(beta_slow)
        if sc.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low), 0, 1)
        pos_freqs = theta ** (torch.arange(0, dim, 2, device=device).float() / dim)
        extra = 1 - ramp  # the extrapolation weight
        inv = (1.0 / (factor * pos_freqs)) * (1 - extra) + (1.0 / pos_freqs) * extra
        return inv, float(att)
    return inv_freq, 1.0


def rope_cache(max_seq_len: int, head_dim: int, theta: float = 1e6, device=None, scaling=None,
               inv_freq=None, attention_scaling: float = 1.0):
    """cos, sin tables, fp32 of shape (max_seq_len, head_dim // 2): angle[p, i] = p * inv_freq[i],
    inv_freq[i] = theta ** (-2i / head_dim) (HF / minimind convention).

    `scaling` extends the context YaRN-style as minimind does at inference: a dict with `factor`
    (default 16), `original_max_position_embeddings` (2048), `beta_fast` (32), `beta_slow` (1) and
    `attention_factor` (1.0) — or a (factor, original_max_position) tuple. When max_seq_len exceeds
    the original length, inv_freq[i] *= (1 - ramp[i]) + ramp[i] / factor with ramp rising linearly
    from 0 to 1 between the dims whose wavelength is beta_fast and beta_slow turns over the original
    length (high frequencies kept, low ones interpolated); cos and sin are scaled by attention_factor.

    `inv_freq` / `attention_scaling` (from `rope_frequencies`, transformers' rope types) replace the
    default frequencies; cos and sin are then multiplied by attention_scaling.
    """
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"rope_cache: head_dim must be even and positive, got {head_dim}")
    if max_seq_len < 0:
        raise ValueError(f"rope_cache: max_seq_len must be >= 0, got {max_seq_len}")
    half = head_dim // 2
    attn_factor = attention_scaling
    if inv_freq is not None:  # given (rope_frequencies: a transformers rope type)
        inv_freq = inv_freq.to(device=device, dtype=torch.float32)
    else:
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device)[:half].float() / head_dim))
    if scaling is not None:
        factor, orig, beta_fast, beta_slow, attn_factor = _yarn_params(scaling)
        if max_seq_len / orig > 1.0:
            def inv_dim(b):  # the dim index whose wavelength makes b turns over `orig` positions
                return (head_dim * math.log(orig / (b * 2 * math.pi))) / (2 * math.log(theta))

            low, high = max(math.floor(inv_dim(beta_fast)), 0), min(math.ceil(inv_dim(beta_slow)), half - 1)
            ramp = torch.clamp((torch.arange(half, device=device).float() - low) / max(high - low, 0.001), 0, 1)
            inv_freq = inv_freq * (1 - ramp + ramp / factor)
    t = torch.arange(max_seq_len, device=device)
    freqs = torch.outer(t, inv_freq).float()
    return torch.cos(freqs) * attn_factor, torch.sin(freqs) * attn_factor


def _split_positions(positions):
    """None | int | tensor -> (positions tensor or None, int offset) for the schema."""
    if positions is None:
        return None, 0
    if isinstance(positions, torch.Tensor):
        return positions, 0
    if isinstance(positions, (numbers.Integral, torch.SymInt)) and not isinstance(positions, bool):
        return None, positions
    raise TypeError(f"rope: positions must be None, an int offset or a (B, S) int tensor, got {type(positions).__name__}")


def rope_reference(q, k, cos, sin, positions=None, interleaved=False):
    """fp32 reference of rope (same signature and semantics); fp64 stays fp64. Differentiable
    through plain torch ops. No range check beyond torch's indexing."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    S = q.shape[1]
    if positions is None or not isinstance(positions, torch.Tensor):
        pos = (torch.arange(S, device=q.device) + (positions or 0))[None]  # (1, S)
    else:
        pos = positions.long()  # (B|1, S)
    c = cos[pos].to(acc)[:, :, None, :]  # (B|1, S, 1, D/2)
    s = sin[pos].to(acc)[:, :, None, :]

    def rotate(x):
        xf = x.to(acc)
        h = x.shape[-1] // 2
        x1, x2 = (xf[..., 0::2], xf[..., 1::2]) if interleaved else (xf[..., :h], xf[..., h:])
        y1, y2 = x1 * c - x2 * s, x2 * c + x1 * s
        y = torch.stack((y1, y2), -1).flatten(-2) if interleaved else torch.cat((y1, y2), -1)
        return y.to(x.dtype)

    return rotate(q), rotate(k)


def rope(q, k, cos, sin, positions=None, interleaved=False):
    """Rotates q (B, S, Hq, D) and k (B, S, Hkv, D) in one kernel launch; returns new contiguous
    (q_out, k_out). See the module docstring for layouts, positions and numerics."""
    if use_reference("rope", q):
        return rope_reference(q, k, cos, sin, positions, interleaved)
    pos, offset = _split_positions(positions)
    return ops.rope_fwd(q, k, cos, sin, pos, offset, interleaved)


def rope_(q, k, cos, sin, positions=None, interleaved=False):
    """In-place rope for inference: q and k are overwritten (strided views of a fused qkv buffer
    included; they must not overlap each other) and returned. No autograd: raises if grad mode is
    on and q or k requires grad (use `rope` for training)."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        raise RuntimeError("llmcore: rope_ is in place and for inference only; q/k require grad — use rope() "
                           "or wrap the call in torch.no_grad()")
    if use_reference("rope_", q):
        qo, ko = rope_reference(q, k, cos, sin, positions, interleaved)
        q.copy_(qo)
        k.copy_(ko)
        return q, k
    pos, offset = _split_positions(positions)
    ops.rope_(q, k, cos, sin, pos, offset, interleaved)
    return q, k


def _contig_like(x):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.register_fake("llmcore::rope_fwd")
def _rope_fwd_fake(q, k, cos, sin, positions, position_offset, interleaved):
    return _contig_like(q), _contig_like(k)


@torch.library.register_fake("llmcore::rope_bwd")
def _rope_bwd_fake(dq, dk, cos, sin, positions, position_offset, interleaved):
    return _contig_like(dq), _contig_like(dk)


@torch.library.register_fake("llmcore::rope_")
def _rope_inplace_fake(q, k, cos, sin, positions, position_offset, interleaved):
    return None


def _rope_setup(ctx, inputs, output):
    q, k, cos, sin, positions, offset, interleaved = inputs
    ctx.save_for_backward(cos, sin, positions)
    ctx.offset, ctx.interleaved = offset, interleaved
    ctx.q_meta = (q.shape, q.dtype, q.device)
    ctx.k_meta = (k.shape, k.dtype, k.device)


def _grads(ctx, dq, dk):
    if dq is None:
        dq = torch.zeros(ctx.q_meta[0], dtype=ctx.q_meta[1], device=ctx.q_meta[2])
    if dk is None:
        dk = torch.zeros(ctx.k_meta[0], dtype=ctx.k_meta[1], device=ctx.k_meta[2])
    return dq, dk


def _rope_fwd_backward(ctx, dq, dk):
    cos, sin, positions = ctx.saved_tensors
    dq, dk = ops.rope_bwd(*_grads(ctx, dq, dk), cos, sin, positions, ctx.offset, ctx.interleaved)
    return dq, dk, None, None, None, None, None


def _rope_bwd_backward(ctx, ddq, ddk):  # the inverse of the inverse rotation: double backward
    cos, sin, positions = ctx.saved_tensors
    a, b = ops.rope_fwd(*_grads(ctx, ddq, ddk), cos, sin, positions, ctx.offset, ctx.interleaved)
    return a, b, None, None, None, None, None


torch.library.register_autograd("llmcore::rope_fwd", _rope_fwd_backward, setup_context=_rope_setup)
torch.library.register_autograd("llmcore::rope_bwd", _rope_bwd_backward, setup_context=_rope_setup)
