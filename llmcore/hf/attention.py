"""The "llmcore" entry of transformers' attention-function registry: our flash_attn / flash_attn_varlen
behind HF's attention call, with HF's sdpa as the fallback for what our kernel cannot express.

    register()  ->  AttentionInterface["llmcore"] = llmcore_attention
                    AttentionMaskInterface["llmcore"] = flash_attention_mask (HF's FA2 mask: None or 2D)

Call (the signature of transformers.integrations.sdpa_attention.sdpa_attention_forward):
    llmcore_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs)
    query (B, Hq, Sq, D), key/value (B, Hkv, Sk, D) -> (out (B, Sq, Hq, D), None)
The mask arrives as HF's flash-attention mask: None (plain causal) or the 2D padding mask (B, Sk) bool.
Cases, each exact w.r.t. HF's sdpa path (same visible keys per query):
- mask None, Sq == Sk, position_ids without restarts: flash_attn causal (bottom-right == top-left).
- mask None, Sq == Sk, no cache, position_ids restarting (packed documents; HF's
  find_packed_sequence_indices rule: a new document where pos[t] - pos[t-1] != 1): flash_attn_varlen
  over the documents. With a cache (use_cache=True, HF's default in eval and train) HF ignores the
  restarts and attends plain causal; so do we.
- mask None, Sq < Sk (decoding with a cache): flash_attn causal, bottom-right aligned as HF's q_offset.
- 2D padding mask, Sq == Sk (right, left or holes): the valid tokens of each row are gathered into one
  varlen sequence (causal over the compacted row == causal & padding); padded query rows give 0.
- 2D padding mask, Sq < Sk, all query tokens valid: valid keys gathered, queries dense, bottom-right.
Fallback to HF's sdpa (with the equivalent 4D bool mask built here): dropout > 0 in training, a 4D or
other mask given by the caller, a sliding window shorter than the longest sequence, padded queries
with a cache, output_attentions-style requests are not served by either (HF returns None weights).
Dtypes: what flash_attn takes (CPU fp32/bf16/fp16; CUDA fp16/bf16 with D in {64, 96, 128}); other
combinations (e.g. CUDA fp32, D = 80 on CUDA) fall back to sdpa.
"""
import torch

import llmcore.ops as ops

NAME = "llmcore"


def register():
    """Registers the attention function and its mask function under the name "llmcore" (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    AttentionInterface.register(NAME, llmcore_attention)
    AttentionMaskInterface.register(NAME, flash_attention_mask)


def _kernel_ok(q):
    if q.device.type == "cpu":
        return q.dtype in (torch.float32, torch.bfloat16, torch.float16) and q.shape[-1] <= 256
    if q.device.type == "cuda":
        return q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in (64, 96, 128)
    return False


def _segments(position_ids, B, S):
    """Packed-document starts from position_ids (B|1, S): bool (B, S), True where a document starts;
    None when no row restarts (plain causal)."""
    if position_ids is None or S < 2 or position_ids.shape[-1] != S:
        return None
    pos = position_ids.expand(B, S)
    start = torch.ones_like(pos, dtype=torch.bool)
    start[:, 1:] = (pos[:, 1:] - pos[:, :-1]) != 1
    if not start[:, 1:].any():
        return None
    return start


def _cu(lengths):
    return torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)


def _sdpa_fallback(module, query, key, value, attention_mask, scaling, dropout, sliding_window, starts, **kwargs):
    """HF's sdpa on the 4D bool mask equivalent to (causal bottom-right, window, padding, documents)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    B, Sq, Sk = query.shape[0], query.shape[2], key.shape[2]
    if attention_mask is not None and attention_mask.ndim != 2:
        mask = attention_mask  # the caller's own mask: passed through untouched
    else:
        dev = query.device
        i = torch.arange(Sq, device=dev)[:, None] + (Sk - Sq)
        j = torch.arange(Sk, device=dev)[None, :]
        mask = (j <= i)[None].expand(B, Sq, Sk)
        if sliding_window is not None:
            mask = mask & (j > i - sliding_window)[None]
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, -Sk:].bool()
        if starts is not None:
            seg = starts.cumsum(-1)
            mask = mask & (seg[:, :, None] == seg[:, None, :])
        mask = mask[:, None]
    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                  is_causal=False, **kwargs)


def llmcore_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """See the module docstring. Returns (out (B, Sq, Hq, D), None)."""
    sliding_window = kwargs.pop("sliding_window", None)
    position_ids = kwargs.get("position_ids")
    B, Hq, Sq, D = query.shape
    Sk = key.shape[2]
    # HF detects packed documents only without a cache (masking_utils._preprocess_mask_arguments); the
    # decoder layers pass use_cache resolved from the config, and a cache exists exactly when it is True
    # (our rope forward also sets it when the caller passed a cache).
    packed = attention_mask is None and Sq == Sk and not kwargs.get("use_cache")
    starts = _segments(position_ids, B, Sq) if packed else None

    def fallback():
        return _sdpa_fallback(module, query, key, value, attention_mask, scaling, dropout, sliding_window,
                              starts, **kwargs)

    if (dropout and module.training) or not _kernel_ok(query) or (attention_mask is not None and attention_mask.ndim != 2):
        return fallback()
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, S, H, D) views
    if attention_mask is None and starts is None:
        if sliding_window is not None and Sk > sliding_window:
            return fallback()
        return ops.flash_attn(q, k, v, causal=True, softmax_scale=scaling), None
    if attention_mask is None:  # packed documents in each row
        flat = starts.flatten().nonzero().squeeze(1)
        lengths = torch.diff(flat, append=flat.new_tensor([B * Sq]))
        max_len = int(lengths.max())
        if sliding_window is not None and max_len > sliding_window:
            return fallback()
        cu = _cu(lengths)
        out = ops.flash_attn_varlen(q.reshape(B * Sq, Hq, D), k.reshape(B * Sk, -1, D), v.reshape(B * Sk, -1, D),
                                    cu, cu, max_len, max_len, causal=True, softmax_scale=scaling)
        return out.view(B, Sq, Hq, D), None
    pad = attention_mask[:, -Sk:].bool()  # (B, Sk)
    lengths_k = pad.sum(-1)
    max_k = int(lengths_k.max())
    if sliding_window is not None and max_k > sliding_window:
        return fallback()
    idx_k = pad.flatten().nonzero().squeeze(1)
    kf = k.reshape(B * Sk, -1, D).index_select(0, idx_k)
    vf = v.reshape(B * Sk, -1, D).index_select(0, idx_k)
    cu_k = _cu(lengths_k)
    if Sq == Sk:
        qf = q.reshape(B * Sq, Hq, D).index_select(0, idx_k)
        out = ops.flash_attn_varlen(qf, kf, vf, cu_k, cu_k, max_k, max_k, causal=True, softmax_scale=scaling)
        full = out.new_zeros(B * Sq, Hq, D).index_copy(0, idx_k, out)
        return full.view(B, Sq, Hq, D), None
    if not pad[:, -Sq:].all():
        return fallback()
    cu_q = torch.arange(0, (B + 1) * Sq, Sq, device=q.device, dtype=torch.int32)
    out = ops.flash_attn_varlen(q.reshape(B * Sq, Hq, D), kf, vf, cu_q, cu_k, Sq, max_k, causal=True,
                                softmax_scale=scaling)
    return out.view(B, Sq, Hq, D), None
