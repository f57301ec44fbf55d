"""Mixture-of-experts routing: route, dispatch (permute), combine (weighted un-permute), balancing.

    w, ids = moe_route(router_logits, top_k, score="softmax", renormalize=True, bias=None)
    x_perm, tokens_per_expert, offsets, row_map = moe_dispatch(x, ids, num_experts)
    ...  experts: rows offsets[e]:offsets[e+1] of x_perm belong to expert e (grouped matmuls)
    y = moe_combine(y_perm, w, row_map, num_tokens)
    loss = loss + coef * moe_aux_loss(router_logits, ids)       # Switch-style balance loss
    moe_bias_update_(bias, tokens_per_expert, gamma)            # DeepSeek-V3 aux-loss-free step

Shapes, dtypes, layout
- router_logits (T, E) float32/float16/bfloat16 (float64 on CPU); rows may be strided.
- topk_weights (T, k) float32 (float64 for float64 logits); topk_ids (T, k) int32.
- x (T, H) any of the float dtypes; x_permuted (T*k, H) in x's dtype, contiguous.
- tokens_per_expert (E,) int32; offsets (E+1,) int32 with offsets[0] = 0, offsets[E] = T*k, so
  offsets[1:] is what torch._grouped_mm takes as `offs`.
- row_map (T, k) int32: row_map[t, s] is the row of x_permuted holding token t's copy for its
  s-th expert. Pairs (t, s) are ordered expert-major and, inside one expert, by t*k + s: a stable
  counting sort, so the permutation is exact and reproducible (no sorting ties, no atomics).
- y (T, H) in y_permuted's dtype.

Numerics
- Scores in fp32 (fp64 for fp64): softmax with the row max subtracted, or sigmoid. Top-k picks
  the k largest of scores + bias (bias: DeepSeek-V3's e_score_correction_bias, for selection
  only: the weights come from the unbiased scores). Ties go to the lower expert id; NaN scores
  rank with -inf, so ids are always k distinct valid experts. renormalize: w / (sum(w) + 1e-20).
- moe_combine accumulates y[t] = sum_s w[t, s] * y_perm[row_map[t, s]] in fp32, slots in order
  s = 0..k-1, and rounds once to the output dtype; each token is one independent gather, so the
  result is deterministic (bit-identical run to run) with no float atomics. The gradient of
  topk_weights is an fp32 dot product per (t, s); dispatch's backward is the same gather
  (weights 1).
- CUDA: at most 1024 experts (route, dispatch); the CPU kernels have no limit.
"""
import torch

from llmcore.ops._lib import ops, use_reference

_SCORES = ("softmax", "sigmoid")


def _acc(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _scores(logits_acc, score):
    if score == "softmax":
        return torch.softmax(logits_acc, dim=-1)
    if score == "sigmoid":
        return torch.sigmoid(logits_acc)
    raise ValueError(f"score must be one of {_SCORES}, got {score!r}")


# ---------------------------------------------------------------- references (fp32 oracles)
def moe_route_reference(router_logits, top_k, score="softmax", renormalize=True, bias=None):
    """Pure-PyTorch moe_route: the selection is a stable descending sort of scores + bias (ties
    keep the lower id), NaN keys treated as -inf."""
    s = _scores(router_logits.to(_acc(router_logits)), score)
    key = s if bias is None else s + bias.to(s.dtype)
    key = torch.nan_to_num(key, nan=float("-inf"))
    ids = torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :top_k]
    w = s.gather(-1, ids)
    if renormalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w, ids.to(torch.int32)


def moe_dispatch_reference(x, topk_ids, num_experts):
    """Pure-PyTorch moe_dispatch: torch's stable sort of the flattened expert ids."""
    T, k = topk_ids.shape
    flat = topk_ids.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices            # (T*k,) pair index at each position
    row_map = torch.empty_like(order)
    row_map[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    x_perm = x[order // k]                                    # (T*k, H)
    return x_perm, counts.to(torch.int32), offsets.to(torch.int32), row_map.view(T, k).to(torch.int32)


def moe_combine_reference(y_permuted, topk_weights, row_map, num_tokens):
    """Pure-PyTorch moe_combine: gather the k rows of each token, weight, sum in fp32.
    A row_map entry -1 (a slot moe_dispatch dropped) contributes nothing."""
    T, k = row_map.shape
    acc = _acc(y_permuted)
    kept = (row_map >= 0).unsqueeze(-1)                                                      # (T, k, 1)
    rows = y_permuted.to(acc)[row_map.reshape(-1).long().clamp(min=0)].view(T, k, y_permuted.shape[1])  # (T, k, H)
    w = torch.ones(T, k, dtype=acc, device=y_permuted.device) if topk_weights is None else topk_weights.to(acc)
    return torch.where(kept, rows * w.unsqueeze(-1), 0).sum(1).to(y_permuted.dtype)


# ---------------------------------------------------------------- public functions
def moe_route(router_logits, top_k, score="softmax", renormalize=True, bias=None):
    """Top-k routing. Returns (topk_weights (T, k) fp32, topk_ids (T, k) int32); differentiable
    in router_logits through topk_weights. See the module docstring for the numerics."""
    if score not in _SCORES:
        raise ValueError(f"score must be one of {_SCORES}, got {score!r}")
    if use_reference("moe_route", router_logits):
        return moe_route_reference(router_logits, top_k, score, renormalize, bias)
    return ops.moe_route_fwd(router_logits, top_k, score, renormalize, bias)


def moe_dispatch(x, topk_ids, num_experts):
    """Permute token rows into expert-contiguous order (stable counting sort).
    Returns (x_permuted (T*k, H), tokens_per_expert (E,) int32, offsets (E+1,) int32,
    row_map (T, k) int32). Differentiable in x (backward: dx[t] = sum_s dx_perm[row_map[t, s]]).
    topk_ids: int32 or int64 (saturated to int32, never wrapped: 2**32 + 1 stays out of range),
    values in [0, num_experts). Out-of-range ids raise on CPU; on CUDA
    (no host sync to check them) they are dropped: their row_map entry is -1, offsets[E] < T*k,
    and moe_combine treats those slots as zero."""
    if use_reference("moe_dispatch", x):
        return moe_dispatch_reference(x, topk_ids, num_experts)
    return ops.moe_dispatch_fwd(x, topk_ids, num_experts)


def moe_combine(y_permuted, topk_weights, row_map, num_tokens):
    """y[t] = sum_s topk_weights[t, s] * y_permuted[row_map[t, s]], fp32 accumulation,
    deterministic. topk_weights is cast to fp32 (fp64 next to fp64 rows) if needed.
    Differentiable in y_permuted and topk_weights.
    row_map (T, k) int32 as moe_dispatch returns it: entries in [0, T*k), or -1 for a slot that
    moe_dispatch dropped (contributes nothing). Any other entry raises (forward and backward)
    before a kernel runs. On CUDA that check is one aminmax on the device plus a host sync per
    call (skipped inside a CUDA-graph capture, where the kernels still skip bad entries, so
    nothing is read out of bounds either way)."""
    if use_reference("moe_combine", y_permuted):
        return moe_combine_reference(y_permuted, topk_weights, row_map, num_tokens)
    if topk_weights is not None and topk_weights.dtype != _acc(y_permuted):
        topk_weights = topk_weights.to(_acc(y_permuted))
    return ops.moe_combine_fwd(y_permuted, topk_weights, row_map, num_tokens)


def moe_aux_loss(router_logits, topk_ids, score="softmax", seq_len=None):
    """Switch-Transformer load-balancing loss  E * sum_i f_i * P_i  (1.0 when perfectly balanced).

    f_i: fraction of the T*k routed (token, slot) pairs that went to expert i (not differentiable);
    P_i: mean over tokens of the router probability of expert i (softmax; for sigmoid scores the
    per-token normalized s / sum(s), as DeepSeek-V3's sequence-wise loss). seq_len=None: one
    batch-level loss over all T tokens. seq_len=S: T must be B*S; the loss is computed per
    sequence and averaged over the B sequences (DeepSeek-V3 / minimind `seq_aux`).
    fp32; returns a 0-d tensor differentiable in router_logits."""
    T, E = router_logits.shape
    k = topk_ids.shape[1]
    s = _scores(router_logits.to(_acc(router_logits)), score)
    if score == "sigmoid":
        s = s / (s.sum(-1, keepdim=True) + 1e-20)
    if T == 0:
        return s.sum() * 0.0  # no tokens: zero, still attached to the graph
    S = T if seq_len is None else seq_len
    if S <= 0 or T % S:
        raise ValueError(f"seq_len must divide the number of tokens {T}, got {seq_len}")
    B = T // S
    ids = topk_ids.reshape(B, S * k).long()
    counts = torch.zeros(B, E, dtype=s.dtype, device=s.device).scatter_add_(1, ids, torch.ones_like(ids, dtype=s.dtype))
    f = counts / (S * k)                                     # (B, E)
    P = s.view(B, S, E).mean(1)                              # (B, E)
    return (E * (f * P).sum(-1)).mean()


@torch.no_grad()
def moe_bias_update_(bias, tokens_per_expert, gamma):
    """DeepSeek-V3 aux-loss-free balancing step, in place:  bias_i += gamma * sign(mean_load - load_i).
    Underloaded experts get a larger selection bias, overloaded ones a smaller one. Call after
    the optimizer step with the load counted since the previous update. Returns bias."""
    load = tokens_per_expert.to(device=bias.device, dtype=torch.float32)
    bias.add_((gamma * torch.sign(load.mean() - load)).to(bias.dtype))
    return bias


# ---------------------------------------------------------------- fake kernels
@torch.library.register_fake("llmcore::moe_route_fwd")
def _moe_route_fwd_fake(router_logits, top_k, score, renormalize, bias):
    T = router_logits.shape[0]
    return (router_logits.new_empty((T, top_k), dtype=_acc(router_logits)),
            router_logits.new_empty((T, top_k), dtype=torch.int32))


@torch.library.register_fake("llmcore::moe_route_bwd")
def _moe_route_bwd_fake(dweights, router_logits, topk_ids, score, renormalize):
    return router_logits.new_empty(router_logits.shape)


@torch.library.register_fake("llmcore::moe_dispatch_fwd")
def _moe_dispatch_fwd_fake(x, topk_ids, num_experts):
    T, H = x.shape
    k = topk_ids.shape[1]
    i32 = dict(dtype=torch.int32)
    return (x.new_empty((T * k, H)), x.new_empty((num_experts,), **i32), x.new_empty((num_experts + 1,), **i32),
            x.new_empty((T, k), **i32))


@torch.library.register_fake("llmcore::moe_combine_fwd")
def _moe_combine_fwd_fake(y_permuted, topk_weights, row_map, num_tokens):
    return y_permuted.new_empty((row_map.shape[0], y_permuted.shape[1]))


@torch.library.register_fake("llmcore::moe_combine_bwd")
def _moe_combine_bwd_fake(dy, y_permuted, topk_weights, row_map):
    return y_permuted.new_empty(y_permuted.shape), topk_weights.new_empty(topk_weights.shape)


# ---------------------------------------------------------------- autograd
def _route_setup(ctx, inputs, output):
    logits, _, score, renormalize, _ = inputs
    ctx.score, ctx.renormalize = score, renormalize
    ctx.save_for_backward(logits, output[1])


def _route_backward(ctx, dweights, _dids):
    logits, ids = ctx.saved_tensors
    if dweights is None:
        return None, None, None, None, None
    return ops.moe_route_bwd(dweights, logits, ids, ctx.score, ctx.renormalize), None, None, None, None


def _dispatch_setup(ctx, inputs, output):
    ctx.num_tokens = inputs[0].shape[0]
    ctx.save_for_backward(output[3])


def _dispatch_backward(ctx, dx_permuted, _d1, _d2, _d3):
    (row_map,) = ctx.saved_tensors
    if dx_permuted is None:
        return None, None, None
    return ops.moe_combine_fwd(dx_permuted, None, row_map, ctx.num_tokens), None, None


def _combine_setup(ctx, inputs, output):
    y_permuted, topk_weights, row_map, _ = inputs
    ctx.has_weights = topk_weights is not None
    ctx.save_for_backward(y_permuted, topk_weights if ctx.has_weights else None, row_map)


def _combine_backward(ctx, dy):
    y_permuted, w, row_map = ctx.saved_tensors
    if not ctx.has_weights:
        w = torch.ones(row_map.shape, dtype=_acc(y_permuted), device=y_permuted.device)
    dyp, dw = ops.moe_combine_bwd(dy, y_permuted, w, row_map)
    return dyp, (dw if ctx.has_weights else None), None, None


torch.library.register_autograd("llmcore::moe_route_fwd", _route_backward, setup_context=_route_setup)
torch.library.register_autograd("llmcore::moe_dispatch_fwd", _dispatch_backward, setup_context=_dispatch_setup)
torch.library.register_autograd("llmcore::moe_combine_fwd", _combine_backward, setup_context=_combine_setup)
