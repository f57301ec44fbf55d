"""NF4Linear: a frozen NF4 (bitsandbytes-format) base weight + optional frozen bias, for QLoRA.

    layer = NF4Linear.from_linear(nn.Linear(4096, 4096), blocksize=64, double_quant=True)
    y = layer(x)            # x (..., in_features) -> y (..., out_features)

Forward: W = nf4_dequantize(weight, compute_dtype) (out_features, in_features), then
y = x @ W.T + bias. The whole weight is dequantized once per call (one launch on CUDA) and dropped
right after the matmul; backward dequantizes again instead of keeping W alive, so the only
persistent weight memory is the 4.127-bit NF4 form. Only the input gets a gradient:
dx = dy @ W; the weight and bias are frozen (requires_grad False), as in QLoRA.
Compute dtype: `compute_dtype` when set; else the autocast dtype when autocast is on for x's device
(the output then has that dtype, as nn.Linear under autocast); else x's dtype. x is cast to it,
the matmul runs in it (fp32 accumulation inside the GEMM), dx comes back in x's dtype.
Whole-matrix dequant rather than tile-wise fusion: on CPU the matmul dominates at training shapes
and the dequant at decode shapes is bandwidth-bound either way (bench/bench_nf4.py).
"""
from typing import Optional

import torch
from torch import nn

from llmcore.ops.nf4 import NF4Weight, nf4_dequantize, nf4_quantize

_NF4_BUFFERS = ("weight_data", "weight_absmax", "weight_absmax2", "weight_code2", "weight_offset")


def _dequant(data, absmax, absmax2, code2, offset, blocksize, shape, dtype):
    nf4 = NF4Weight(data=data, absmax=absmax, shape=shape, dtype=dtype, blocksize=blocksize, absmax2=absmax2,
                    code2=code2, offset=offset)
    return nf4_dequantize(nf4, dtype)


class _NF4LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, data, absmax, absmax2, code2, offset, blocksize, shape, dtype):
        w = _dequant(data, absmax, absmax2, code2, offset, blocksize, shape, dtype)  # (out, in)
        y = torch.nn.functional.linear(x, w, None if bias is None else bias.to(dtype))
        ctx.save_for_backward(data, absmax, absmax2, code2, offset)
        ctx.meta = (blocksize, shape, dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        dx = None
        if ctx.needs_input_grad[0]:
            blocksize, shape, dtype = ctx.meta
            w = _dequant(*ctx.saved_tensors, blocksize, shape, dtype)  # recomputed, never stored
            dx = dy.to(dtype) @ w
        return dx, None, None, None, None, None, None, None, None, None


class NF4Linear(nn.Module):
    """y = x @ dequant(W).T + bias with W stored as NF4 (see the module docstring).

    Buffers (saved in state_dict): weight_data uint8 (ceil(out*in/2),), weight_absmax (fp32 scales or
    uint8 double-quantized scales), and for double quant weight_absmax2 fp32, weight_code2 fp32 (256,),
    weight_offset fp32 0-d. bias: a frozen Parameter (out_features,) or None.
    """

    def __init__(self, nf4: NF4Weight, bias: Optional[torch.Tensor] = None,
                 compute_dtype: Optional[torch.dtype] = None):
        super().__init__()
        if len(nf4.shape) != 2:
            raise ValueError(f"NF4Linear: the weight must be 2-D (out_features, in_features), got {tuple(nf4.shape)}")
        self.out_features, self.in_features = int(nf4.shape[0]), int(nf4.shape[1])
        self.blocksize = nf4.blocksize
        self.weight_dtype = nf4.dtype
        self.compute_dtype = compute_dtype
        self.register_buffer("weight_data", nf4.data)
        self.register_buffer("weight_absmax", nf4.absmax)
        self.register_buffer("weight_absmax2", nf4.absmax2)
        self.register_buffer("weight_code2", nf4.code2)
        self.register_buffer("weight_offset", nf4.offset)
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(f"NF4Linear: bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: Optional[torch.dtype] = None) -> "NF4Linear":
        """Quantize an nn.Linear's weight (on its device) to NF4; the bias is kept as is (frozen)."""
        nf4 = nf4_quantize(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant)
        return cls(nf4, linear.bias, compute_dtype=compute_dtype)

    @property
    def weight(self) -> NF4Weight:
        """The NF4 weight (views of this module's buffers)."""
        return NF4Weight(data=self.weight_data, absmax=self.weight_absmax,
                         shape=torch.Size((self.out_features, self.in_features)), dtype=self.weight_dtype,
                         blocksize=self.blocksize, absmax2=self.weight_absmax2, code2=self.weight_code2,
                         offset=self.weight_offset)

    def weight_dequantized(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dequantized weight (out_features, in_features) in dtype (default: the original dtype)."""
        return nf4_dequantize(self.weight, dtype or self.weight_dtype)

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        if self.compute_dtype is not None:
            return self.compute_dtype
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"NF4Linear: x must have last dim {self.in_features}, got shape {tuple(x.shape)}")
        dtype = self._compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            return _NF4LinearFn.apply(x.to(dtype), self.bias, self.weight_data, self.weight_absmax,
                                      self.weight_absmax2, self.weight_code2, self.weight_offset, self.blocksize,
                                      torch.Size((self.out_features, self.in_features)), dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, double_quant={self.weight_absmax2 is not None}, "
                f"compute_dtype={self.compute_dtype}")
