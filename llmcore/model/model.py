"""The model: one flat Llama-style decoder (minimind architecture), dense or MoE.

    ids (B, S) -> embed -> n_layers x [ h += attn(attn_norm(h)); h += ffn(mlp_norm(h)) ] -> norm
               -> logits = y @ lm_head.T   (lm_head = embed.weight when tied, else output.weight)

The config's options (llmcore.model.config) make the same file every family llmcore imports:
QK-norm (Qwen3 / minimind-3), q/k/v (and o) biases (Qwen2), an untied head, a head_dim of its own,
transformers' RoPE scaling types, MoE without shared experts / with a gated one.

The residual stream is carried through llmcore.ops.add_rms_norm: each block receives the branch
output of the previous block plus the residual h, and each norm returns (normed, new h), so the
residual add is fused into the norm. h stays in the parameter dtype (fp32 under autocast); the
branches (attention, MLP) run in the autocast dtype.

Parameter names (stable, Llama-like; the HF exporter maps them):
    embed.weight, layers.{i}.attn_norm.weight, layers.{i}.attn.{wq,wk,wv,wo}.weight (.bias with
    attn_bias / attn_out_bias), layers.{i}.attn.{q_norm,k_norm}.weight (qk_norm),
    layers.{i}.mlp_norm.weight, layers.{i}.mlp.{w_gate,w_up,w_down}.weight, norm.weight,
    output.weight (untied only)

Packed batches: `positions` (B, S) restarting at 0 at each document start. When a restart occurs
inside a row, attention runs per document (flash_attn_varlen on cu_seqlens from positions), so no
token attends across documents; RoPE uses the given positions.

Labels are pre-shifted, as llmcore.data's datasets (and minimind's) make them: labels[b, t] is the
target of the logits at (b, t), i.e. the token after input_ids[b, t]; -100 = no loss. The loss is mean cross-entropy in fp32 plus, for MoE,
the routers' aux losses; with cfg.fused_ce (the default) it comes from llmcore.ops.fused_linear_cross_entropy
(chunked, no (B, S, V) logits; loss 0 rather than NaN when no position is labelled).
"""
import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmcore.model.config import ModelConfig
from llmcore.nn import MLP, Attention, AttnMeta, MoEFeedForward, RMSNorm, Rotary
from llmcore.ops.fused_linear_cross_entropy import fused_linear_cross_entropy

from llmcore.data.datasets import cu_seqlens_from_positions


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.backend)
        self.attn = Attention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.backend, head_dim=cfg.head_dim,
                              bias=cfg.attn_bias, out_bias=cfg.attn_out_bias, qk_norm=cfg.qk_norm,
                              norm_eps=cfg.norm_eps)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.backend)
        if cfg.n_experts > 0:
            self.mlp = MoEFeedForward(cfg.dim, cfg.ffn_hidden, cfg.n_experts, cfg.top_k,
                                      num_shared_experts=cfg.n_shared_experts, score=cfg.moe_score,
                                      renormalize=cfg.moe_renormalize, aux_loss_coef=cfg.aux_loss_coef,
                                      balance=cfg.moe_balance, shared_gate=cfg.shared_expert_gate)
        else:
            self.mlp = MLP(cfg.dim, cfg.ffn_hidden, cfg.backend)

    def forward(self, x, h, rotary, meta, kv_cache=None):
        """x: previous branch output (B, S, dim); h: residual stream (None in the first block, where x is it)."""
        if h is None:
            h, y = x, self.attn_norm(x)
        else:
            y, h = self.attn_norm(x, h)
        a = self.attn(y, rotary, meta, kv_cache)
        y, h = self.mlp_norm(a, h)
        return self.mlp(y), h


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.backend)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.backend, cfg.rope_scaling)
        self.grad_checkpointing = 0  # 0 = off; N = recompute every N-th block in the backward
        self.reset_parameters()

    def set_grad_checkpointing(self, every: int = 1):
        """Activation checkpointing: in training forwards, every `every`-th block (1 = all, 0 = off)
        keeps only its inputs and recomputes its activations in the backward
        (torch.utils.checkpoint, non-reentrant: works with the custom ops, LoRA, MoE, torch.compile)."""
        if every < 0:
            raise ValueError(f"grad checkpointing: every must be >= 0, got {every}")
        self.grad_checkpointing = int(every)
        return self

    def _run_layer(self, i, layer, x, h, meta, kv):
        n = self.grad_checkpointing
        if not (n and self.training and kv is None and torch.is_grad_enabled() and i % n == 0):
            return layer(x, h, self.rotary, meta, kv)
        from torch.utils.checkpoint import checkpoint

        from llmcore.nn.moe import recomputing

        return checkpoint(layer, x, h, self.rotary, meta, kv, use_reentrant=False,
                          context_fn=lambda: (contextlib.nullcontext(), recomputing()))

    @property
    def lm_head(self) -> torch.Tensor:
        """The output projection (vocab, dim): embed.weight when tied, else output.weight."""
        return self.embed.weight if self.output is None else self.output.weight

    def reset_parameters(self):
        """GPT-2 style init: N(0, init_std) everywhere, residual output projections scaled by
        1/sqrt(2 n_layers); norms at 1."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name.endswith(("wo.weight", "w_down.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (fwd + bwd): 6 N (active params, embedding counted once as the
        lm_head matmul) + 12 L S dim (attention scores and values, causal counted in full)."""
        c = self.cfg
        n = self.num_params() - c.vocab_size * c.dim  # embedding lookup is free; the lm_head matmul is not
        if c.n_experts:
            per_expert = 3 * c.dim * c.ffn_hidden
            n -= c.n_layers * (c.n_experts - c.top_k) * per_expert
        if c.tie_embeddings:
            n += c.vocab_size * c.dim
        return 6 * n + 12 * c.n_layers * seq_len * c.n_heads * c.head_dim

    def _check_window(self, length: int):
        w = self.cfg.sliding_window
        if w and length > w:
            raise ValueError(f"a forward over {length} positions exceeds sliding_window={w}: llmcore has no "
                             f"sliding-window attention kernel, so it refuses rather than attend beyond the window "
                             f"(keep sequences <= {w} tokens)")

    def _attn_meta(self, input_ids, positions, cache):
        B, S = input_ids.shape
        if cache is not None:
            pos = cache.seqlens.long()[:, None] + torch.arange(S, device=input_ids.device)[None, :]
            length = int(cache.seqlens.max()) + S
            self._check_window(length)
            self.rotary.ensure(length if self.rotary.dynamic else cache.max_len)
            return AttnMeta(positions=pos, cache_seqlens=cache.seqlens)
        if positions is None:
            self._check_window(S)
            self.rotary.ensure(S)
            return AttnMeta()
        positions = positions.long()
        self._check_window(int(positions.max()) + 1)
        self.rotary.ensure(int(positions.max()) + 1)
        if not bool((positions[:, 1:] == 0).any()):
            return AttnMeta(positions=positions)
        cu, max_len = cu_seqlens_from_positions(positions)
        meta = AttnMeta(positions=positions, cu_seqlens=cu.to(input_ids.device), max_seqlen=int(max_len))
        if self.cfg.backend == "torch":
            start = positions == 0
            start[:, 0] = True
            doc = start.cumsum(1)  # (B, S) document index within the row
            causal = torch.ones(S, S, dtype=torch.bool, device=input_ids.device).tril()
            meta.doc_mask = ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]  # (B, 1, S, S)
        return meta

    def forward(self, input_ids, positions=None, labels=None, cache=None):
        """input_ids (B, S) long; positions (B, S) or None; labels (B, S) or None; cache a KVCache
        (decoding: positions come from cache.seqlens, which the caller advances afterwards).
        Returns logits (B, S, vocab) or, with labels, (logits, loss) — (None, loss) when cfg.fused_ce
        and backend "llmcore" (the loss then never materializes the logits; call again without labels
        for them). The torch backend always takes logits + F.cross_entropy: the plain-PyTorch baseline."""
        meta = self._attn_meta(input_ids, positions, cache)
        x, h = self.embed(input_ids), None  # (B, S, dim)
        for i, layer in enumerate(self.layers):
            kv = (cache.k[i], cache.v[i]) if cache is not None else None
            x, h = self._run_layer(i, layer, x, h, meta, kv)
        y, _ = self.norm(x, h)
        if labels is not None and self.cfg.fused_ce and self.cfg.backend == "llmcore":
            logits, loss = None, self._fused_loss(y, labels)
        else:
            logits = F.linear(y, self.lm_head)  # (B, S, vocab)
            if labels is None:
                return logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        aux = self.aux_loss()
        if aux is not None:
            loss = loss + aux
        return logits, loss

    def _fused_loss(self, y, labels):
        """Mean cross-entropy of y @ lm_head.T against labels without the (B, S, V) logits. Under
        autocast the head runs in the autocast dtype, as F.linear would (the cast's backward returns
        fp32 gradients to the fp32 parameter); all-ignored labels give loss 0 (F.cross_entropy: NaN)."""
        w = self.lm_head
        if torch.is_autocast_enabled(y.device.type):
            dt = torch.get_autocast_dtype(y.device.type)
            y, w = y.to(dt), w.to(dt)
        elif y.dtype != w.dtype:
            y = y.to(w.dtype)
        return fused_linear_cross_entropy(y.flatten(0, 1), w, labels.flatten(), ignore_index=-100)

    def aux_loss(self):
        """Sum of the MoE routers' aux losses from the last forward (None for a dense model)."""
        if not self.cfg.n_experts:
            return None
        return sum(layer.mlp.aux_loss for layer in self.layers)


class KVCache:
    """Per-layer key/value buffers (B, max_len, n_kv_heads, head_dim) and the valid length of each
    row (`seqlens`, int32 (B,)). The model reads seqlens; the caller advances it after each forward."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)
        self.max_len = max_len
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)

    def advance(self, n: int):
        self.seqlens += n

    def rows(self, start: int, stop: int) -> "KVCache":
        """A view of rows [start, stop): buffers and seqlens share storage with this cache, so a
        forward (and advance) on the view fills those rows in place. Used to prefill one prompt
        into its slot of a batch whose rows then decode together at their own lengths."""
        if not 0 <= start < stop <= self.seqlens.shape[0]:
            raise ValueError(f"rows({start}, {stop}) outside a cache of {self.seqlens.shape[0]} rows")
        view = KVCache.__new__(KVCache)
        view.max_len = self.max_len
        view.k = [k[start:stop] for k in self.k]
        view.v = [v[start:stop] for v in self.v]
        view.seqlens = self.seqlens[start:stop]
        return view


def build_model(cfg: ModelConfig) -> Transformer:
    return Transformer(cfg)
