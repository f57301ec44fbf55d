"""Fused linear + cross-entropy: the loss of `hidden @ weight.T (+ bias)` without the (N, V) logits.

    fused_linear_cross_entropy(hidden, weight, target, bias=None, ignore_index=-100,
                               reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None)
      == F.cross_entropy(hidden @ weight.T + bias, target, ignore_index=ignore_index,
                         reduction=reduction, label_smoothing=label_smoothing)
         (+ z_loss * lse^2 per labelled token; logits softcapped first when softcap is given)

Liger-Kernel's LigerFusedLinearCrossEntropyLoss computes the same loss (its lse_square_scale is our
z_loss, its softcap ours). Rows are processed a chunk at a time (a (chunk, V) buffer of ~32 MB on
CPU, 256 MB on CUDA): GEMM (oneDNN / cuBLAS), then one fused pass per row — max, log-sum-exp, loss,
and the logits gradient written in place — then the dhidden and dweight GEMMs of that chunk.

Shapes: hidden (..., H), weight (V, H), target (...) int64/int32 with the same leading shape,
bias (V,) or None. Dtypes: hidden, weight (and bias) float32 / float16 / bfloat16 (float64 on CPU),
all the same; the loss is float32 (float64 for float64 inputs); gradients in the input dtype.
Numerics: logits in the input dtype (as `hidden @ weight.T` in that dtype gives them), every
statistic (max, lse, the loss, the softmax gradient) in fp32; 16-bit dweight accumulated over chunks
in fp32, rounded once.
Semantics:
- reduction "mean" averages over the labelled rows (target != ignore_index), as PyTorch does;
  when no row is labelled the loss is 0 and every gradient 0 (PyTorch's mean gives NaN there:
  0/0; a batch with nothing to learn is not a divergence). "sum" and "none" as PyTorch
  ("none": (...) per-token losses, 0 at ignored rows).
- ignored rows contribute nothing, not even a NaN: they are dropped before the GEMMs (so they
  also cost nothing). A target outside [0, V) that is not ignore_index raises, naming the row.
- NaN / inf in a labelled row's logits make that row's loss and its gradient row NaN, and so
  dweight (as in PyTorch).
Gradients: for "mean" / "sum" with inputs that need grad they are computed in the forward, chunk
by chunk (Liger's scheme: 3 GEMMs per chunk, nothing but the gradients kept), and the backward is a
scale by the upstream scalar. "none" (a per-token upstream gradient, unknown in the forward)
recomputes the logits chunk by chunk in the backward (4 GEMMs).
Memory beyond the inputs: the chunk buffer, dhidden (N, H), dweight (V, H) (+ an fp32 (V, H)
accumulator and a (V, H) partial for 16-bit inputs over several chunks) — never O(N x V).
Loop order: by row chunks as above, or — when the vocabulary is much larger than the batch (V > 2 N
over several chunks, e.g. Qwen's 151936 vs 4096 tokens), where re-reading and re-writing the (V, H)
dweight per chunk would cost more than the GEMMs — in two passes: the loss and every row's lse by
row chunks, then vocabulary blocks of all rows, each dweight block one GEMM over every row and
dhidden (N, H) accumulated over the blocks (fp32 for 16-bit): four GEMMs instead of three.
`chunk_rows` (rows per chunk) and `vocab_chunk` (columns per vocabulary block; > 0 forces the
vocabulary order) are 0 = automatic; tests set them to cross chunk boundaries in both orders.
"""
import torch
import torch.nn.functional as F

from llmcore.ops._lib import ops, use_reference

__all__ = ["fused_linear_cross_entropy", "fused_linear_cross_entropy_reference"]

_REDUCTIONS = ("mean", "sum", "none")


def _check_args(reduction, softcap):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap!r}")


def fused_linear_cross_entropy_reference(hidden, weight, target, bias=None, ignore_index=-100, reduction="mean",
                                         label_smoothing=0.0, z_loss=0.0, softcap=None, chunk_rows=0, vocab_chunk=0):
    """Pure-PyTorch twin (same signature; chunk_rows and vocab_chunk are ignored): full fp32 logits (fp64 for
    fp64 inputs) and F.cross_entropy. Loss in fp32 (fp64); all-ignored mean -> 0."""
    _check_args(reduction, softcap)
    with torch.autocast(hidden.device.type, enabled=False):  # fp32 even inside an autocast region
        return _reference(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, softcap)


def _reference(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, softcap):
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    lead = target.shape
    x = hidden.reshape(-1, hidden.shape[-1]).to(acc)
    t = target.reshape(-1).long()
    logits = x @ weight.to(acc).T  # (N, V)
    if bias is not None:
        logits = logits + bias.to(acc)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    valid = t != ignore_index
    bad = valid & ((t < 0) | (t >= weight.shape[0]))
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"target must hold class indices in [0, V = {weight.shape[0]}) or ignore_index = "
                         f"{ignore_index}, got {int(t[row])} at row {row}")
    rows = F.cross_entropy(logits, t, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    if z_loss:
        rows = rows + z_loss * torch.logsumexp(logits, -1).square() * valid
    if reduction == "none":
        return rows.view(lead)
    total = rows.sum()
    return total / valid.sum().clamp(min=1) if reduction == "mean" else total


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias=None,
                               ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                               z_loss: float = 0.0, softcap=None, chunk_rows: int = 0, vocab_chunk: int = 0) -> torch.Tensor:
    """Cross-entropy of hidden @ weight.T (+ bias) against target, never holding the logits.
    See the module docstring for shapes, dtypes, numerics and semantics."""
    if use_reference("fused_linear_cross_entropy", hidden):
        return fused_linear_cross_entropy_reference(hidden, weight, target, bias, ignore_index, reduction,
                                                    label_smoothing, z_loss, softcap, chunk_rows, vocab_chunk)
    _check_args(reduction, softcap)
    lead = target.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    t = target.reshape(-1)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad
                                              or (bias is not None and bias.requires_grad))
    loss, _, _, _ = ops.fused_linear_cross_entropy_fwd(
        h, weight, t, bias, int(ignore_index), float(label_smoothing), float(z_loss), float(softcap or 0.0),
        reduction, bool(needs_grad and reduction != "none"), int(chunk_rows), int(vocab_chunk))
    return loss.view(lead) if reduction == "none" else loss


def _loss_dtype(hidden):
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


@torch.library.register_fake("llmcore::fused_linear_cross_entropy_fwd")
def _fwd_fake(hidden, weight, target, bias, ignore_index, label_smoothing, z_loss, softcap, reduction,
              compute_grads, chunk_rows, vocab_chunk):
    N, H = hidden.shape
    loss = hidden.new_empty((N,) if reduction == "none" else (), dtype=_loss_dtype(hidden))
    if not compute_grads:
        e = hidden.new_empty((0,))
        return loss, e, e.clone(), e.clone()
    db = hidden.new_empty((weight.shape[0],)) if bias is not None else hidden.new_empty((0,))
    return loss, hidden.new_empty((N, H)), weight.new_empty(weight.shape), db


@torch.library.register_fake("llmcore::fused_linear_cross_entropy_bwd")
def _bwd_fake(grad_loss, hidden, weight, target, bias, ignore_index, label_smoothing, z_loss, softcap, reduction,
              chunk_rows, vocab_chunk):
    db = hidden.new_empty((weight.shape[0],)) if bias is not None else hidden.new_empty((0,))
    return hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), db


def _is_eager_cpu_one(g):
    return (type(g) is torch.Tensor and g.device.type == "cpu" and not torch.compiler.is_compiling()
            and bool(g == 1))


def _setup(ctx, inputs, output):
    (hidden, weight, target, bias, ignore_index, label_smoothing, z_loss, softcap, reduction, compute_grads, chunk_rows,
     vocab_chunk) = inputs
    _, dh, dw, db = output
    ctx.has_bias = bias is not None
    ctx.set_materialize_grads(False)  # the gradient outputs get no gradient: no zero (N, H) / (V, H) tensors
    ctx.precomputed = bool(compute_grads)
    ctx.args = (ignore_index, label_smoothing, z_loss, softcap, reduction, chunk_rows, vocab_chunk)
    if ctx.precomputed:
        ctx.save_for_backward(dh, dw, db)
    else:
        ctx.save_for_backward(hidden, weight, target, bias)


def _backward(ctx, grad_loss, _gdh, _gdw, _gdb):
    if grad_loss is None:  # only the gradient outputs were used (their gradient is not defined: none)
        return (None,) * 12
    if ctx.precomputed:
        dh, dw, db = ctx.saved_tensors
        db = db if ctx.has_bias else None
        # an upstream 1 (loss.backward()) returns the forward's gradients as they are (autograd clones
        # them if it must store them); checked eagerly on CPU only (no device sync, no graph break)
        if not _is_eager_cpu_one(grad_loss):
            g = grad_loss.to(dh.dtype)
            dh, dw, db = dh * g, dw * g, (db * g if db is not None else None)
    else:
        hidden, weight, target, bias = ctx.saved_tensors
        dh, dw, db = ops.fused_linear_cross_entropy_bwd(grad_loss, hidden, weight, target, bias, *ctx.args)
        db = db if ctx.has_bias else None
    return dh, dw, None, db, None, None, None, None, None, None, None, None


torch.library.register_autograd("llmcore::fused_linear_cross_entropy_fwd", _backward, setup_context=_setup)
