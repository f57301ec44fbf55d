"""SwiGLU feed-forward: w_down(silu(w_gate x) * up(w_up x)), no biases (Llama/minimind)."""
import torch.nn as nn
import torch.nn.functional as F

from llmcore.nn._pending_ops import swiglu  # TODO(merge rope_swiglu): from llmcore.ops import swiglu


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, backend: str = "llmcore"):
        super().__init__()
        self.backend = backend
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):  # x (..., dim)
        g, u = self.w_gate(x), self.w_up(x)  # (..., hidden)
        h = swiglu(g, u) if self.backend == "llmcore" else F.silu(g) * u
        return self.w_down(h)
