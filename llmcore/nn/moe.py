"""MoEFeedForward: a routed + shared-expert SwiGLU feed-forward layer over llmcore.ops.moe_*.

    y = sum_{s < k} w[t, s] * expert_{ids[t, s]}(x[t])  +  shared(x[t])
    expert_e(x) = down_e( silu(gate_e x) * up_e x )

Per forward: router logits (nn.Linear, no bias) -> moe_route (top-k, softmax or sigmoid,
renormalized) -> moe_dispatch (stable counting sort into expert-contiguous rows) -> grouped matmuls
(one matmul per expert over its contiguous rows; torch._grouped_mm on CUDA for bf16 when present)
-> SwiGLU -> grouped matmuls -> moe_combine (deterministic weighted gather back to token order)
-> + shared experts (one dense SwiGLU MLP of width num_shared_experts * ffn_hidden, which equals
the sum of that many separate experts).

Parameters (stacked, nn.Linear's (out, in) convention per expert):
  gate.weight (E, H); gate_up_proj (E, 2F, H) — rows [0, F) gate, [F, 2F) up; down_proj (E, H, F);
  shared_gate_up.weight (2 S F, H), shared_down.weight (H, S F) when num_shared_experts S > 0, and
  with shared_gate shared_expert_gate.weight (1, H): shared(x) * sigmoid(x @ g) (Qwen2-MoE);
  buffer expert_bias (E,) fp32: DeepSeek-V3's selection bias (balance="bias").

Load balancing and the trainer contract:
- balance="aux": after each training forward `layer.aux_loss` holds aux_loss_coef * the
  Switch-style loss (llmcore.ops.moe_aux_loss; per sequence when seq_aux and the input is
  (B, S, H), else over the batch). The trainer adds it to the loss. It is a 0-d zero tensor in
  eval mode and for the other balance modes, so summing it is always safe.
- balance="bias": aux-loss-free. Training forwards add the per-expert token counts into the
  buffer `expert_load`; after optimizer.step() the trainer calls `layer.update_bias(gamma)`
  (bias_i += gamma * sign(mean_load - load_i), then the count restarts), so gradient
  accumulation micro-batches are all counted. The bias only changes which experts are chosen.
- balance="none": neither.
`expert_load` is counted in every mode (useful for logging); `reset_load()` clears it.

torch.compile: the ops are custom ops with fake kernels (fullgraph-safe), but the per-expert
matmul loop reads the expert counts on the host (`counts.tolist()`), a graph break; on CUDA with
bf16 activations torch._grouped_mm takes the counts as a device tensor instead (no sync for the
counts; moe_combine's row_map range check still syncs once per combine call, forward and
backward — see llmcore.ops.moe_combine).
"""
import contextlib
import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

from llmcore.ops.moe import (moe_aux_loss, moe_bias_update_, moe_combine, moe_dispatch, moe_route,
                             moe_route_reference)
from llmcore.ops.swiglu import swiglu_packed

_BALANCE = ("aux", "bias", "none")
_RECOMPUTE = threading.local()


@contextlib.contextmanager
def recomputing():
    """Marks an activation-checkpointing recompute (the model's checkpoint context_fn): the
    forward's side effects (expert_load counts, aux_loss) happened already and are not repeated."""
    prev = getattr(_RECOMPUTE, "on", False)
    _RECOMPUTE.on = True
    try:
        yield
    finally:
        _RECOMPUTE.on = prev


def _swiglu_torch(g, u):
    """Plain-PyTorch SwiGLU for the comparison implementations below."""
    return F.silu(g) * u


def _grouped_mm_ok(x, w):
    """torch._grouped_mm (CUTLASS grouped GEMM, Hopper+) handles bf16 rows whose widths are
    multiples of 16 bytes; everything else takes the per-expert loop."""
    return (x.is_cuda and hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16
            and x.shape[1] % 8 == 0 and w.shape[1] % 8 == 0 and torch.cuda.get_device_capability(x.device) >= (9, 0))


def grouped_linear(x, weight, offsets, counts):
    """out[rows of expert e] = x[rows of expert e] @ weight[e].T for contiguous expert row ranges.

    x (N, in) with expert e's rows at [offsets[e], offsets[e+1]); weight (E, out, in);
    counts (E,) int32. Returns (N, out) in x's dtype (weight is cast to it, so autocast-produced
    16-bit rows run 16-bit matmuls). The loop path reads the counts on the host (one sync on CUDA)."""
    w = weight.to(x.dtype)
    if _grouped_mm_ok(x, w):
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets[1:])
    sizes = counts.tolist()
    return torch.cat([F.linear(xe, w[e]) for e, xe in enumerate(torch.split(x, sizes))], dim=0)


class MoEFeedForward(nn.Module):
    """Routed-expert SwiGLU FFN with optional shared experts. See the module docstring.

    Input (..., hidden) — e.g. (B, S, H) or (T, H) — any float dtype; output of the same shape.
    """

    def __init__(self, hidden, ffn_hidden, num_experts, top_k, num_shared_experts=0, score="softmax",
                 renormalize=True, aux_loss_coef=0.01, balance="aux", seq_aux=True, shared_gate=False):
        super().__init__()
        if balance not in _BALANCE:
            raise ValueError(f"balance must be one of {_BALANCE}, got {balance!r}")
        if score not in ("softmax", "sigmoid"):
            raise ValueError(f"score must be 'softmax' or 'sigmoid', got {score!r}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.hidden, self.ffn_hidden, self.num_experts, self.top_k = hidden, ffn_hidden, num_experts, top_k
        self.num_shared_experts, self.score, self.renormalize = num_shared_experts, score, renormalize
        self.aux_loss_coef, self.balance, self.seq_aux = aux_loss_coef, balance, seq_aux
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * ffn_hidden, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, ffn_hidden))
        if num_shared_experts > 0:
            self.shared_gate_up = nn.Linear(hidden, 2 * num_shared_experts * ffn_hidden, bias=False)
            self.shared_down = nn.Linear(num_shared_experts * ffn_hidden, hidden, bias=False)
            # Qwen2-MoE: the shared output is scaled per token by sigmoid(x @ shared_expert_gate)
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False) if shared_gate else None
        else:
            self.shared_gate_up = self.shared_down = self.shared_expert_gate = None
        self.register_buffer("expert_bias", torch.zeros(num_experts))
        self.register_buffer("expert_load", torch.zeros(num_experts, dtype=torch.int64), persistent=False)
        self.aux_loss = torch.zeros(())
        self.reset_parameters()

    def _apply(self, fn, *args, **kwargs):
        # .to(bfloat16) etc. would round the selection bias; its +-gamma steps need fp32.
        super()._apply(fn, *args, **kwargs)
        self.expert_bias = self.expert_bias.float()
        return self

    def reset_parameters(self):
        """Each expert initialized like an nn.Linear of its shape: U(-1/sqrt(in), 1/sqrt(in))."""
        nn.init.uniform_(self.gate_up_proj, -1 / math.sqrt(self.hidden), 1 / math.sqrt(self.hidden))
        nn.init.uniform_(self.down_proj, -1 / math.sqrt(self.ffn_hidden), 1 / math.sqrt(self.ffn_hidden))

    def route(self, x2):
        """(T, H) -> router logits (T, E), weights (T, k) fp32, ids (T, k) int32."""
        logits = self.gate(x2)
        bias = self.expert_bias if self.balance == "bias" else None
        w, ids = moe_route(logits, self.top_k, self.score, self.renormalize, bias)
        return logits, w, ids

    def shared(self, x2):
        if self.shared_gate_up is None:
            return None
        y = self.shared_down(swiglu_packed(self.shared_gate_up(x2)))  # [gate | up] -> (T, S*Fs) -> (T, H)
        if self.shared_expert_gate is not None:
            y = torch.sigmoid(self.shared_expert_gate(x2)) * y
        return y

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, self.hidden)                                      # (T, H)
        T = x2.shape[0]
        logits, w, ids = self.route(x2)                                      # (T, E), (T, k), (T, k)
        xp, counts, offsets, row_map = moe_dispatch(x2, ids, self.num_experts)  # (T*k, H)
        h = grouped_linear(xp, self.gate_up_proj, offsets, counts)           # (T*k, 2F)
        yp = grouped_linear(swiglu_packed(h), self.down_proj, offsets, counts)  # (T*k, H)
        y = moe_combine(yp, w, row_map, T)                                   # (T, H)
        s = self.shared(x2)
        if s is not None:
            y = y + s
        recompute = getattr(_RECOMPUTE, "on", False)  # the same ops again, without the side effects
        if self.training and not recompute:
            with torch.no_grad():
                self.expert_load += counts.to(self.expert_load.device, torch.int64)
        if self.training and self.balance == "aux" and self.aux_loss_coef > 0:
            seq_len = shape[-2] if (self.seq_aux and len(shape) == 3) else None
            aux = self.aux_loss_coef * moe_aux_loss(logits, ids, self.score, seq_len)
        else:
            aux = logits.new_zeros((), dtype=torch.float32)
        if not recompute:
            self.aux_loss = aux
        return y.view(shape)

    @torch.no_grad()
    def update_bias(self, gamma=1e-3):
        """Aux-loss-free balancing step (call after optimizer.step()): bias_i += gamma *
        sign(mean_load - load_i) over the load counted since the last call; then restart the count.
        Only meaningful with balance="bias" (the bias is not used otherwise)."""
        moe_bias_update_(self.expert_bias, self.expert_load, gamma)
        self.reset_load()

    @torch.no_grad()
    def reset_load(self):
        self.expert_load.zero_()

    def extra_repr(self):
        return (f"hidden={self.hidden}, ffn_hidden={self.ffn_hidden}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, num_shared_experts={self.num_shared_experts}, score={self.score!r}, "
                f"balance={self.balance!r}")


# ---------------------------------------------------------------- comparison implementations
def _expert(layer, e, xe):
    F_ = layer.ffn_hidden
    wgu = layer.gate_up_proj[e].to(xe.dtype)
    h = F.linear(xe, wgu)
    return F.linear(_swiglu_torch(h[:, :F_], h[:, F_:]), layer.down_proj[e].to(xe.dtype))


def _route_torch(layer, x2):
    logits = layer.gate(x2)
    bias = layer.expert_bias if layer.balance == "bias" else None
    w, ids = moe_route_reference(logits, layer.top_k, layer.score, layer.renormalize, bias)
    return w, ids.long()


def moe_feed_forward_loop(layer, x):
    """The naive baseline: minimind's training-mode MoE — repeat each token k times, then a Python
    loop over experts with boolean-mask gather / scatter, then the weighted sum over the k copies.
    Same routing, weights and math as the layer (no aux loss); a benchmark and test peer."""
    shape = x.shape
    x2 = x.reshape(-1, layer.hidden)
    w, ids = _route_torch(layer, x2)
    flat = ids.reshape(-1)
    xr = x2.repeat_interleave(layer.top_k, dim=0)                           # (T*k, H)
    y = torch.empty_like(xr)
    for e in range(layer.num_experts):
        mask = flat == e
        y[mask] = _expert(layer, e, xr[mask]).to(y.dtype)
    y = (y.view(*w.shape, -1) * w.unsqueeze(-1).to(y.dtype)).sum(dim=1)
    s = layer.shared(x2)
    return (y if s is None else y + s).view(shape)


def moe_feed_forward_scatter(layer, x):
    """The torch-ops peer: argsort by expert, index_select rows, per-expert matmuls over the
    contiguous ranges, weighted index_add_ back (fp32 accumulation). Same math as the layer."""
    shape = x.shape
    x2 = x.reshape(-1, layer.hidden)
    T, k = x2.shape[0], layer.top_k
    w, ids = _route_torch(layer, x2)
    order = torch.argsort(ids.reshape(-1), stable=True)                    # (T*k,)
    tok = order // k
    counts = torch.bincount(ids.reshape(-1), minlength=layer.num_experts)
    xp = x2.index_select(0, tok)
    outs = [_expert(layer, e, xe) for e, xe in enumerate(torch.split(xp, counts.tolist()))]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    yp = torch.cat(outs, 0).to(acc) * w.reshape(-1)[order].unsqueeze(-1).to(acc)
    y = torch.zeros(T, layer.hidden, dtype=acc, device=x.device).index_add_(0, tok, yp).to(x.dtype)
    s = layer.shared(x2)
    return (y if s is None else y + s).view(shape)
