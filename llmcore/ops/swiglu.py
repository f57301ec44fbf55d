"""SwiGLU activation: silu(gate) * up, separate or packed.

    swiglu(gate, up)          y = silu(gate) * up = gate * sigmoid(gate) * up
    swiglu_packed(gate_up)    the same on a fused projection output whose last dim is [gate | up]

Shapes: gate and up (..., F), same shape, any leading dims (contiguous inputs run flat; strided
rows with unit column stride are read in place, other layouts copied); gate_up (..., 2F) -> (..., F).
Dtypes: float32 / float16 / bfloat16 (float64 on CPU); gate and up the same dtype; y in it.
Numerics: fp32 math (fp64 for float64), one rounding of y. Backward recomputes sigmoid(gate) from
gate (nothing else is saved) with PyTorch's silu_backward expression:
dgate = (dy * up) * s * (1 + gate * (1 - s)), dup = dy * silu(gate). Large |gate| is safe (exp
overflow gives s = 0, silu = -0); inf / -inf / NaN propagate exactly as in F.silu(gate) * up
(silu(-inf) = NaN, silu(inf) = inf). swiglu_packed's backward writes [dgate | dup] into a single
(..., 2F) gradient (no concatenation). CPU exp is a vectorized polynomial (common/cpu_math.h,
about 2 ulp in fp32).
"""
import torch
import torch.nn.functional as F

from llmcore.ops._lib import ops, use_reference

__all__ = ["swiglu", "swiglu_packed", "swiglu_reference", "swiglu_packed_reference"]


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """fp32 reference of swiglu (same signature); fp64 stays fp64."""
    acc = torch.float64 if gate.dtype == torch.float64 else torch.float32
    return (F.silu(gate.to(acc)) * up.to(acc)).to(gate.dtype)


def swiglu_packed_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """fp32 reference of swiglu_packed: gate_up (..., 2F) = [gate | up]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return swiglu_reference(gate, up)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up. See the module docstring for shapes, dtypes and numerics."""
    if use_reference("swiglu", gate):
        return swiglu_reference(gate, up)
    return ops.swiglu_fwd(gate, up)


def swiglu_packed(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate_up[..., :F]) * gate_up[..., F:] for a fused gate/up projection output (..., 2F)."""
    if use_reference("swiglu_packed", gate_up):
        return swiglu_packed_reference(gate_up)
    return ops.swiglu_packed_fwd(gate_up)


def _contig_like(x, shape=None):
    return torch.empty(x.shape if shape is None else shape, dtype=x.dtype, device=x.device)


@torch.library.register_fake("llmcore::swiglu_fwd")
def _swiglu_fwd_fake(gate, up):
    return _contig_like(gate)


@torch.library.register_fake("llmcore::swiglu_bwd")
def _swiglu_bwd_fake(dy, gate, up):
    return _contig_like(gate), _contig_like(gate)


@torch.library.register_fake("llmcore::swiglu_packed_fwd")
def _swiglu_packed_fwd_fake(gate_up):
    return _contig_like(gate_up, (*gate_up.shape[:-1], gate_up.shape[-1] // 2))


@torch.library.register_fake("llmcore::swiglu_packed_bwd")
def _swiglu_packed_bwd_fake(dy, gate_up):
    return _contig_like(gate_up)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_backward(ctx, dy):
    gate, up = ctx.saved_tensors
    return ops.swiglu_bwd(dy, gate, up)


def _swiglu_packed_backward(ctx, dy):
    (gate_up,) = ctx.saved_tensors
    return ops.swiglu_packed_bwd(dy, gate_up)


torch.library.register_autograd("llmcore::swiglu_fwd", _swiglu_backward, setup_context=_swiglu_setup)
torch.library.register_autograd("llmcore::swiglu_packed_fwd", _swiglu_packed_backward, setup_context=_swiglu_setup)
