"""RMSNorm and the fused residual-add RMSNorm.

    rms_norm(x, weight, eps)           y = x / sqrt(mean(x**2, -1) + eps) * weight
    add_rms_norm(x, residual, weight)  h = x + residual;  return (rms_norm(h, weight), h)

Shapes: x (..., N) with any leading dims (strided rows are read in place when they can be viewed
as (rows, N) with unit column stride, otherwise copied); weight (N,); residual like x.
Dtypes: x in float32 / float16 / bfloat16 (float64 on CPU); weight in x's dtype, or float32 next
to a 16-bit x (fp32 master weights: dweight comes back in float32).
Numerics: mean(x**2) and the normalization in fp32 (fp64 for float64); y rounded once to x's
dtype. For add_rms_norm, h is rounded to x's dtype first and normalized as rounded (vLLM's fused
add-norm does the same), so the returned h is exactly the residual stream the model carries on.
Backward recomputes x_hat from the saved fp32 rstd (N floats never stored per row).
"""
import torch

from llmcore.ops._lib import ops, use_reference


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """fp32 reference of rms_norm (same signature); fp64 stays fp64."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * weight.to(acc)).to(x.dtype)


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6):
    """fp32 reference of add_rms_norm: returns (y, h) with h = x + residual rounded to x's dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = (x.to(acc) + residual.to(acc)).to(x.dtype)
    return rms_norm_reference(h, weight, eps), h


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim. See the module docstring for shapes, dtypes and numerics."""
    if use_reference("rms_norm", x):
        return rms_norm_reference(x, weight, eps)
    return ops.rms_norm_fwd(x, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6):
    """Fused residual add + RMSNorm: returns (rms_norm(x + residual), x + residual)."""
    if use_reference("add_rms_norm", x):
        return add_rms_norm_reference(x, residual, weight, eps)
    y, h, _ = ops.add_rms_norm_fwd(x, residual, weight, eps)
    return y, h


def _stat_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.register_fake("llmcore::rms_norm_fwd")
def _rms_norm_fwd_fake(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[:-1], dtype=_stat_dtype(x))


@torch.library.register_fake("llmcore::add_rms_norm_fwd")
def _add_rms_norm_fwd_fake(x, residual, weight, eps):
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    return y, torch.empty_like(y), x.new_empty(x.shape[:-1], dtype=_stat_dtype(x))


@torch.library.register_fake("llmcore::rms_norm_bwd")
def _rms_norm_bwd_fake(dy, x, weight, rstd, dextra):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _rms_norm_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = ops.rms_norm_bwd(dy, x, weight, rstd, None)
    return dx, dw, None


def _add_rms_norm_setup(ctx, inputs, output):
    _, _, weight, _ = inputs
    _, h, rstd = output
    ctx.save_for_backward(h, weight, rstd)


def _add_rms_norm_backward(ctx, dy, dh, _drstd):
    h, weight, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(h)
    dx, dw = ops.rms_norm_bwd(dy, h, weight, rstd, dh)
    return dx, dx, dw, None


torch.library.register_autograd("llmcore::rms_norm_fwd", _rms_norm_backward, setup_context=_rms_norm_setup)
torch.library.register_autograd("llmcore::add_rms_norm_fwd", _add_rms_norm_backward, setup_context=_add_rms_norm_setup)
