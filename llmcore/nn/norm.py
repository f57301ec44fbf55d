"""RMSNorm module, with the fused residual-add form used by pre-norm blocks.

    norm(x)            -> rms_norm(x) * weight
    norm(x, residual)  -> (rms_norm(x + residual) * weight, x + residual)   (llmcore.ops.add_rms_norm)

backend "llmcore" calls llmcore.ops; "torch" is plain PyTorch (F.rms_norm on fp32 statistics),
the comparison baseline. Weight is kept in fp32 (master weights); y comes out in x's dtype, the
residual stream h in the residual's dtype (x is cast to it first). Under autocast an fp32 y is
returned in the autocast dtype (cast once here rather than once per projection that reads it).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import llmcore.ops as lo


def _autocast_once(y):
    """Under autocast, an fp32 y is cast to the autocast dtype here, once: every projection that
    reads it (wq, wk, wv; w_gate, w_up; the head) would otherwise cast it again, and autograd would
    save each 16-bit copy (3 d·2 bytes per token per layer more; the values are identical)."""
    dev = y.device.type
    if y.dtype == torch.float32 and torch.is_autocast_enabled(dev):
        return y.to(torch.get_autocast_dtype(dev))
    return y


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, backend: str = "llmcore"):
        super().__init__()
        self.dim, self.eps, self.backend = dim, eps, backend
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, residual=None):
        if residual is not None:
            x = x.to(residual.dtype)
            if self.backend == "llmcore":
                y, h = lo.add_rms_norm(x, residual, self.weight, self.eps)
            else:
                h = x + residual
                y = F.rms_norm(h.float(), (self.dim,), self.weight.float(), self.eps).to(h.dtype)
            return _autocast_once(y), h
        if self.backend == "llmcore":
            return _autocast_once(lo.rms_norm(x, self.weight, self.eps))
        return _autocast_once(F.rms_norm(x.float(), (self.dim,), self.weight.float(), self.eps).to(x.dtype))

    def extra_repr(self):
        return f"{self.dim}, eps={self.eps}, backend={self.backend}"
