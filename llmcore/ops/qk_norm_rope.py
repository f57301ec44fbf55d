"""Fused QK-norm + RoPE (Qwen3 / minimind-3 attention): per-head RMSNorm of q and k, then the rotary
embedding, in one pass over q and k.

    q, k = qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps=1e-6, positions=None, interleaved=False)
    qk_norm_rope_(q, k, q_weight, k_weight, cos, sin, ...)     # in place, inference / decode only

equals `rope(rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps), cos, sin, positions, interleaved)`
except that the normalized value is not rounded to q's dtype between the two (one rounding at the end).

Shapes: q (B, S, Hq, D), k (B, S, Hkv, D), any Hkv (GQA), any even D; q_weight, k_weight (D,) shared
by the heads; cos/sin fp32 (max_seq_len, D/2) from `rope_cache` (llmcore.ops.rope's tables and
conventions). q and k may be strided views (slices of one fused qkv projection): any strides for B,
S, H are read in place; a strided last dim is copied (qk_norm_rope) or rejected (qk_norm_rope_).
Outputs are contiguous.
Dtypes: q, k float32 / float16 / bfloat16 (float64 on CPU), same dtype; weights in q's dtype or
float32 next to a 16-bit q (fp32 master weights: their gradients come back in float32).
Positions: as `rope`: None -> 0..S-1; an int o -> o..o+S-1; a (B, S) / (1, S) int32/int64 tensor.
Layout: interleaved=False: half-split pairs (x[i], x[i + D/2]) (HF rotate_half, Qwen3);
interleaved=True: adjacent pairs (x[2i], x[2i+1]).
Numerics: per head row rstd = 1/sqrt(mean(x**2) + eps) in fp32 (fp64 for float64), n = x * rstd * w,
y = rotate(n) in fp32, one rounding to q's dtype. rstd (B, S, H) is saved; backward recomputes n
from it: dn = inverse rotation of dy, dx = rstd * (dn*w - xhat * mean(dn*w*xhat)), dw = sum dn*xhat.
A NaN anywhere in a head row makes that whole row NaN (as rms_norm); cos/sin get no gradient.
"""
import torch

from llmcore.ops._lib import ops, use_reference
from llmcore.ops.rms_norm import rms_norm_reference
from llmcore.ops.rope import _split_positions, rope_reference

__all__ = ["qk_norm_rope", "qk_norm_rope_", "qk_norm_rope_reference"]


def qk_norm_rope_reference(q, k, q_weight, k_weight, cos, sin, eps=1e-6, positions=None, interleaved=False):
    """fp32 reference (same signature): rms_norm_reference then rope_reference on fp32 copies (fp64
    stays fp64), rounded once to q's dtype. Differentiable through plain torch ops."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qn = rms_norm_reference(q.to(acc), q_weight, eps)
    kn = rms_norm_reference(k.to(acc), k_weight, eps)
    qo, ko = rope_reference(qn, kn, cos, sin, positions, interleaved)
    return qo.to(q.dtype), ko.to(k.dtype)


def qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps: float = 1e-6, positions=None, interleaved: bool = False):
    """Normalizes every head of q (B, S, Hq, D) and k (B, S, Hkv, D) with q_weight / k_weight and
    rotates them, one kernel launch; returns new contiguous (q_out, k_out). See the module docstring."""
    if use_reference("qk_norm_rope", q):
        return qk_norm_rope_reference(q, k, q_weight, k_weight, cos, sin, eps, positions, interleaved)
    pos, offset = _split_positions(positions)
    qo, ko, _, _ = ops.qk_norm_rope_fwd(q, k, q_weight, k_weight, cos, sin, pos, offset, interleaved, eps)
    return qo, ko


def qk_norm_rope_(q, k, q_weight, k_weight, cos, sin, eps: float = 1e-6, positions=None, interleaved: bool = False):
    """In-place qk_norm_rope for inference (decode): q and k are overwritten (strided views of a fused
    qkv buffer included; they must not overlap each other) and returned; no rstd is stored. Raises if
    grad mode is on and q or k requires grad (use `qk_norm_rope` for training)."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        raise RuntimeError("llmcore: qk_norm_rope_ is in place and for inference only; q/k require grad — use "
                           "qk_norm_rope() or wrap the call in torch.no_grad()")
    if use_reference("qk_norm_rope_", q):
        qo, ko = qk_norm_rope_reference(q, k, q_weight, k_weight, cos, sin, eps, positions, interleaved)
        q.copy_(qo)
        k.copy_(ko)
        return q, k
    pos, offset = _split_positions(positions)
    ops.qk_norm_rope_(q, k, q_weight, k_weight, cos, sin, pos, offset, interleaved, eps)
    return q, k


def _stat_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _contig_like(x):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.register_fake("llmcore::qk_norm_rope_fwd")
def _qk_norm_rope_fwd_fake(q, k, q_weight, k_weight, cos, sin, positions, position_offset, interleaved, eps):
    return (_contig_like(q), _contig_like(k), q.new_empty(q.shape[:3], dtype=_stat_dtype(q)),
            k.new_empty(k.shape[:3], dtype=_stat_dtype(k)))


@torch.library.register_fake("llmcore::qk_norm_rope_bwd")
def _qk_norm_rope_bwd_fake(dq_out, dk_out, q, k, q_weight, k_weight, q_rstd, k_rstd, cos, sin, positions,
                           position_offset, interleaved):
    return _contig_like(q), _contig_like(k), _contig_like(q_weight), _contig_like(k_weight)


@torch.library.register_fake("llmcore::qk_norm_rope_")
def _qk_norm_rope_inplace_fake(q, k, q_weight, k_weight, cos, sin, positions, position_offset, interleaved, eps):
    return None


def _setup(ctx, inputs, output):
    q, k, q_weight, k_weight, cos, sin, positions, offset, interleaved, _eps = inputs
    ctx.save_for_backward(q, k, q_weight, k_weight, output[2], output[3], cos, sin, positions)
    ctx.offset, ctx.interleaved = offset, interleaved


def _backward(ctx, dq_out, dk_out, _dqr, _dkr):
    q, k, q_weight, k_weight, q_rstd, k_rstd, cos, sin, positions = ctx.saved_tensors
    if dq_out is None:
        dq_out = torch.zeros_like(q, memory_format=torch.contiguous_format)
    if dk_out is None:
        dk_out = torch.zeros_like(k, memory_format=torch.contiguous_format)
    dq, dk, dqw, dkw = ops.qk_norm_rope_bwd(dq_out, dk_out, q, k, q_weight, k_weight, q_rstd, k_rstd, cos, sin,
                                            positions, ctx.offset, ctx.interleaved)
    return dq, dk, dqw, dkw, None, None, None, None, None, None


torch.library.register_autograd("llmcore::qk_norm_rope_fwd", _backward, setup_context=_setup)
