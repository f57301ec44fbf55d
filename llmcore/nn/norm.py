"""RMSNorm module, with the fused residual-add form used by pre-norm blocks.

    norm(x)            -> rms_norm(x) * weight
    norm(x, residual)  -> (rms_norm(x + residual) * weight, x + residual)   (llmcore.ops.add_rms_norm)

backend "llmcore" calls llmcore.ops; "torch" is plain PyTorch (F.rms_norm on fp32 statistics),
the comparison baseline. Weight is kept in fp32 (master weights); y comes out in x's dtype, the
residual stream h in the residual's dtype (x is cast to it first).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import llmcore.ops as lo


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, backend: str = "llmcore"):
        super().__init__()
        self.dim, self.eps, self.backend = dim, eps, backend
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, residual=None):
        if residual is not None:
            x = x.to(residual.dtype)
            if self.backend == "llmcore":
                return lo.add_rms_norm(x, residual, self.weight, self.eps)
            h = x + residual
            return F.rms_norm(h.float(), (self.dim,), self.weight.float(), self.eps).to(h.dtype), h
        if self.backend == "llmcore":
            return lo.rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x.float(), (self.dim,), self.weight.float(), self.eps).to(x.dtype)

    def extra_repr(self):
        return f"{self.dim}, eps={self.eps}, backend={self.backend}"
