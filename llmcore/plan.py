"""Compute / memory / time planner for llmcore models (dense and MoE).

Everything here is closed-form arithmetic on a model config: no model is built. The formulas are
written out so they can be checked by hand, and `tests/interop/test_plan.py` checks them against the
real model (exact parameter count; measured training memory within a stated tolerance).

Parameters (no biases anywhere, tied embeddings unless `tie_word_embeddings=False`):
    embed            V·d
    per layer        attn  d·(H·hd) [wq] + 2·d·(Hkv·hd) [wk, wv] + (H·hd)·d [wo]
                     norms 2·d
                     dense FFN  3·d·F                       (w_gate, w_up, w_down)
                     MoE FFN    d·E [router] + E·3·d·Fe + S·3·d·Fs   (E routed, S shared experts)
    final norm       d
    lm_head          V·d when untied, else 0
  active (per token, MoE): routed experts counted k times (top-k) instead of E times.

FLOPs per token for training (PaLM appendix B convention, used for MFU):
    6·N_matmul + 12·L·H·hd·T
  N_matmul = active parameters that take part in matmuls (everything except norms and the embedding
  lookup; the tied lm_head matmul counts once). The attention term counts QK^T and PV over the full
  T×T square (no causal halving), forward + backward = 3× forward, 2 FLOPs per multiply-add.
  Inference (forward only) is a third of it.

Training memory (bytes), per data-parallel rank of `world` ranks:
    weights  N·w_bytes      grads  N·g_bytes      optimizer  N·o_bytes   (AdamW: m and v)
  precision presets (bytes per parameter for weights / grads / optimizer states):
    fp32        4 / 4 / 8          autocast-bf16 (fp32 master weights, torch.autocast) 4 / 4 / 8
    bf16        2 / 2 / 4  (pure bf16 params, grads and Adam states)
    bf16-mixed  2 / 2 / 12 (bf16 weights + grads, fp32 master copy and fp32 m, v in the optimizer)
  sharding (ZeRO stages / FSDP): 0 = plain DDP (everything replicated); 1 = optimizer states / world;
  2 = + grads / world; 3 (= FSDP full shard) = + weights / world.
  Activations (saved for backward) per micro-batch of B sequences of T tokens, element size `a`
  (2 for bf16/fp16 compute, 4 for fp32), flash attention (no T×T score matrix is kept):
    per layer, per token   a·(2·d + 2·H·hd + 2·Hkv·hd + 3·F_act) + r·2·d + 4·(H + 2)
      2·d: outputs of the two RMSNorms (they feed the projections; under autocast the norm casts its
      output once, so wq/wk/wv and w_gate/w_up share one 16-bit copy), r·2·d: their inputs, the
      residual stream (r = a, or 4 under autocast, where h stays fp32),
      2·H·hd: q and the attention output, 2·Hkv·hd: k and v, 3·F_act: gate, up and silu(gate)·up (the
      SwiGLU kernel recomputes silu in backward) with F_act = F for a dense layer, k·Fe + S·Fs per
      token for MoE, plus, for MoE, the fp32 router logits and probabilities (2·E) and the k dispatched copies of x and of the expert
      outputs (2·k·d));
      fp32: the attention log-sum-exp (H) and the two rstd values.
    final                  (r + a)·d + 4·V (final norm in/out; the fp32 log-softmax of the logits that
                                            the cross-entropy saves)
                           fused_ce: (r + a)·d per token (the final norm's input, dhidden) + a·V·d
                           once (dweight, computed in the forward; no logits are kept)
  Autocast weight copies (`autocast_copies`): a·(every block's matmul weights and biases, and the
  head's V·d unless fused_ce): autocast casts each fp32 weight once per forward and autograd keeps
  the copy for the backward (a checkpointed block's are recast there instead).
  Activation checkpointing (every N-th block, llmcore.model.Transformer.set_grad_checkpointing) keeps
  only a checkpointed block's inputs: the branch output x (a·d) and the fp32 residual h (4·d) per token
  (the first block: its fp32 input only); the other blocks save as without it.
  Transient peak (backward of the loss): the fp32 gradient of the logits, 4·V bytes per token, lives
  next to the saved activations. fused_ce: the larger of the forward's (chunk, V) logits buffer
  (about 32 MB; with 16-bit inputs over several chunks also dweight's fp32 accumulator and partial,
  and under autocast the head's 16-bit copy) and the backward's upstream-scaled dhidden and dweight.
  Peak (`total`): weights + optimizer + the larger of two phases (the trainer frees gradients with
  zero_grad(set_to_none=True), so they and the activations do not coexist in full):
    backward  activations + autocast copies + transient (+ grads when they are held across the step:
              gradient accumulation > 1, or DDP's bucket views with world > 1 and no FSDP)
    update    grads + one fp32 temporary per stepped parameter (foreach AdamW, CUDA's default)
  The backward phase is measured on CPU within 4% (tests/interop/test_plan.py); the update phase's
  temporary is CUDA's foreach AdamW, not measured here (CPU AdamW steps one tensor at a time).

Time: tokens · flops_per_token / (MFU · peak_flops(gpu, precision) · n_gpus).

Recommendation (`recommend`): the first configuration, fastest first, whose estimated total fits
`headroom` (default 85%) of the GPU's memory — the rest is the CUDA context, the caching allocator's
fragmentation and what this estimate misses (on CPU a warm step's total is within 4% of it in fp32 and
under autocast, preset tiny, B 2-16, T 256: tests/interop/test_plan.py; a process's first forward
also holds ~68 MiB of one-time host memory that is not tensors and does not grow with the model):
    1. DDP (torchrun --nproc_per_node N), everything replicated
    2. DDP + --grad-checkpointing (every block: ~30% more compute, activations ~1/L)
    3. --fsdp (FSDP2 full shard over N ranks; only when N > 1)       4. --fsdp + --grad-checkpointing
    5. --fsdp --fsdp-offload + --grad-checkpointing (parameters, grads and optimizer states in CPU
       memory; the GPU holds about two blocks' gathered weights, the activations and the logits)
  and, when none fits, the same ladder with the micro-batch halved (and --grad-accum doubled, so the
  global batch is kept) down to one sequence.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

# Dense peak tensor-core throughput (FLOP/s, no sparsity) from vendor datasheets.
GPUS: dict[str, dict[str, float]] = {
    "H100-SXM": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12, "tf32": 494e12, "mem_gib": 80},
    "H100-PCIe": {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12, "tf32": 378e12, "mem_gib": 80},
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12, "tf32": 494e12, "mem_gib": 141},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12, "tf32": 156e12, "mem_gib": 80},
    "A10G": {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12, "tf32": 62.5e12, "mem_gib": 24},
    "L4": {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12, "tf32": 60e12, "mem_gib": 24},
    "RTX-4090": {"bf16": 165e12, "fp16": 165e12, "fp32": 82.6e12, "tf32": 82.6e12, "mem_gib": 24},
    "RTX-3090": {"bf16": 71e12, "fp16": 71e12, "fp32": 35.6e12, "tf32": 35.6e12, "mem_gib": 24},
    "T4": {"bf16": 65e12, "fp16": 65e12, "fp32": 8.1e12, "tf32": 8.1e12, "mem_gib": 16},
}

# bytes per parameter: (weights, grads, optimizer states) and activation element size
PRECISIONS: dict[str, tuple[int, int, int, int]] = {
    "fp32": (4, 4, 8, 4),
    "autocast-bf16": (4, 4, 8, 2),
    "bf16": (2, 2, 4, 2),
    "bf16-mixed": (2, 2, 12, 2),
}


@dataclasses.dataclass
class Arch:
    """The numbers the planner needs, read from any llmcore/HF-style config."""

    vocab: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int  # dense FFN hidden size
    tied: bool = True
    n_experts: int = 0  # routed experts (0 = dense)
    n_shared: int = 0
    top_k: int = 0
    expert_ffn: int = 0
    shared_ffn: int = 0
    max_seq_len: int = 512
    qk_norm: bool = False       # q/k RMSNorm weights (2 * head_dim per layer)
    qkv_bias: bool = False      # (Hq + 2 Hkv) * head_dim per layer
    o_bias: bool = False        # dim per layer
    shared_gate: bool = False   # dim per layer (Qwen2-MoE's shared_expert_gate)
    fused_ce: bool = False      # loss through fused_linear_cross_entropy (llmcore backend, cfg.fused_ce)

    @property
    def moe(self) -> bool:
        return self.n_experts > 0


def _get(cfg: Any, names: tuple[str, ...], default: Any = None) -> Any:
    for n in names:
        if isinstance(cfg, dict) and n in cfg:
            return cfg[n]
        if not isinstance(cfg, dict) and hasattr(cfg, n):
            return getattr(cfg, n)
    return default


def arch_from_config(cfg: Any) -> Arch:
    """Reads an llmcore ModelConfig (or a dict / HF config with the usual field names)."""
    if isinstance(cfg, Arch):
        return cfg
    dim = int(_get(cfg, ("dim", "hidden_size", "d_model")))
    n_heads = int(_get(cfg, ("n_heads", "num_attention_heads")))
    n_kv = int(_get(cfg, ("n_kv_heads", "num_key_value_heads"), n_heads) or n_heads)
    head_dim = int(_get(cfg, ("head_dim",), None) or dim // n_heads)
    ffn = int(_get(cfg, ("ffn_dim", "hidden_dim", "intermediate_size", "ffn_hidden"), 0) or 0)
    n_exp = int(_get(cfg, ("n_experts", "n_routed_experts", "num_experts", "num_local_experts"), 0) or 0)
    if not _get(cfg, ("use_moe", "moe"), n_exp > 0):
        n_exp = 0
    top_k = int(_get(cfg, ("top_k", "moe_top_k", "num_experts_per_tok"), 0) or 0)
    efn = int(_get(cfg, ("expert_ffn_dim", "moe_ffn_dim", "moe_intermediate_size", "expert_dim"), 0) or ffn)
    n_sh = int(_get(cfg, ("n_shared_experts", "n_shared"), 0) or 0)
    sfn = int(_get(cfg, ("shared_ffn_dim",), 0) or efn)
    hf_shared = int(_get(cfg, ("shared_expert_intermediate_size",), 0) or 0)
    if hf_shared and not n_sh:  # a transformers Qwen2-MoE config: one shared expert of that width
        n_sh, sfn = 1, hf_shared
    return Arch(
        vocab=int(_get(cfg, ("vocab_size", "vocab"))),
        dim=dim,
        n_layers=int(_get(cfg, ("n_layers", "num_hidden_layers"))),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        ffn=ffn,
        tied=bool(_get(cfg, ("tie_embeddings", "tie_word_embeddings", "tied"), True)),
        n_experts=n_exp,
        n_shared=n_sh if n_exp else 0,
        top_k=top_k if n_exp else 0,
        expert_ffn=efn if n_exp else 0,
        shared_ffn=sfn if n_exp else 0,
        max_seq_len=int(_get(cfg, ("max_seq_len", "max_position_embeddings", "seq_len"), 512)),
        qk_norm=bool(_get(cfg, ("qk_norm",), False)),
        qkv_bias=bool(_get(cfg, ("attn_bias",), False)),
        o_bias=bool(_get(cfg, ("attn_out_bias",), False)),
        shared_gate=bool(_get(cfg, ("shared_expert_gate",), False)) and n_sh > 0 and n_exp > 0,
        fused_ce=bool(_get(cfg, ("fused_ce",), False)) and _get(cfg, ("backend",), "llmcore") == "llmcore",
    )


def param_counts(a: Arch) -> dict[str, int]:
    """total / active / embedding / per-part parameter counts."""
    d, hd = a.dim, a.head_dim
    attn = d * a.n_heads * hd * 2 + d * a.n_kv_heads * hd * 2
    attn_bias = (a.n_heads + 2 * a.n_kv_heads) * hd * a.qkv_bias + d * a.o_bias
    norms = 2 * d + 2 * hd * a.qk_norm
    if a.moe:
        router = d * a.n_experts
        routed = a.n_experts * 3 * d * a.expert_ffn
        shared = a.n_shared * 3 * d * a.shared_ffn + d * a.shared_gate
        ffn_total = router + routed + shared
        ffn_active = router + a.top_k * 3 * d * a.expert_ffn + shared
    else:
        ffn_total = ffn_active = 3 * d * a.ffn
    embed = a.vocab * d
    head = 0 if a.tied else a.vocab * d
    total = embed + head + d + a.n_layers * (attn + attn_bias + norms + ffn_total)
    active = embed + head + d + a.n_layers * (attn + attn_bias + norms + ffn_active)
    # parameters taking part in matmuls per token (norms and the embedding gather excluded;
    # the lm_head matmul uses V·d weights whether tied or not)
    matmul_active = a.vocab * d + a.n_layers * (attn + ffn_active)
    return dict(total=total, active=active, embedding=embed, lm_head=head, attention=a.n_layers * attn,
                ffn=a.n_layers * ffn_total, norms=a.n_layers * norms + d, matmul_active=matmul_active)


def flops_per_token(a: Arch, seq_len: int, training: bool = True) -> dict[str, float]:
    """Training (fwd+bwd) or inference (fwd) FLOPs per token; see the module docstring."""
    p = param_counts(a)
    mult = 6 if training else 2
    dense = mult * p["matmul_active"]
    attn = (mult * 2) * a.n_layers * a.n_heads * a.head_dim * seq_len
    return dict(params=float(dense), attention=float(attn), total=float(dense + attn))


def activation_bytes(a: Arch, batch: int, seq_len: int, act_bytes: int = 2, checkpointing: int = 0,
                     residual_bytes: int | None = None) -> int:
    """Bytes saved for backward in one micro-batch (see the module docstring); checkpointing = N
    recomputes every N-th block (True = 1 = all, 0 = none); residual_bytes: the element size of the
    residual stream h (the norms' saved inputs): act_bytes, or 4 under autocast (h stays fp32)."""
    d = a.dim
    rb = act_bytes if residual_bytes is None else residual_bytes
    tokens = batch * seq_len
    every = int(checkpointing)
    n_ckpt = len(range(0, a.n_layers, every)) if every else 0
    if a.moe:
        f_act = a.top_k * a.expert_ffn + a.n_shared * a.shared_ffn
        # router logits/probabilities in fp32; the k dispatched copies of x and of the expert outputs
        extra = 4 * 2 * a.n_experts + act_bytes * 2 * a.top_k * d
    else:
        f_act, extra = a.ffn, 0
    full = act_bytes * (2 * d + 2 * a.n_heads * a.head_dim + 2 * a.n_kv_heads * a.head_dim + 3 * f_act) \
        + rb * 2 * d + 4 * (a.n_heads + 2) + extra
    kept = (act_bytes + 4) * d * n_ckpt - (act_bytes * d if n_ckpt else 0)  # x and h; block 0: its input only
    if a.fused_ce:  # the final norm's input and dhidden per token; dweight (V, d) once
        return int(tokens * ((a.n_layers - n_ckpt) * full + kept + (rb + act_bytes) * d) + act_bytes * a.vocab * d)
    final = (rb + act_bytes) * d + 4 * a.vocab
    return int(tokens * ((a.n_layers - n_ckpt) * full + kept + final))


def memory_bytes(a: Arch, precision: str = "autocast-bf16", zero: int = 0, world: int = 1, batch: int = 1,
                 seq_len: int | None = None, checkpointing: int = 0, grad_accum: int = 1) -> dict[str, int]:
    """Per-rank training memory (bytes): weights, grads, optimizer states (AdamW), activations,
    autocast_copies, transient (at the start of backward), total (the estimated peak: see the module
    docstring, "Peak") and peak_phase ("backward" or "update")."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"zero must be 0, 1, 2 or 3 (3 = FSDP full shard), got {zero}")
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    wb, gb, ob, ab = PRECISIONS[precision]
    n = param_counts(a)["total"]
    weights, grads, opt = n * wb, n * gb, n * ob
    if zero >= 1:
        opt = math.ceil(opt / world)
    if zero >= 2:
        grads = math.ceil(grads / world)
    if zero >= 3:
        weights = math.ceil(weights / world)
    T = seq_len or a.max_seq_len
    autocast = precision.startswith("autocast")
    act = activation_bytes(a, batch, T, ab, checkpointing, residual_bytes=4 if autocast else ab)
    # autocast's 16-bit copies of the matmul weights (and biases), cast once per forward and saved
    # for backward: every parameter but the norms and the embedding gather, plus the head's V·d
    pc = param_counts(a)
    every = int(checkpointing)
    n_ckpt = len(range(0, a.n_layers, every)) if every else 0  # checkpointed blocks recast in backward
    blocks = n - pc["norms"] - pc["embedding"] - pc["lm_head"]
    head = 0 if a.fused_ce else a.vocab * a.dim  # fused_ce keeps dweight (counted above), not the head's copy
    copies = ab * (blocks * (a.n_layers - n_ckpt) // a.n_layers + head) if autocast else 0
    if zero >= 3:
        copies = math.ceil(copies / world)  # FSDP gathers and casts one block at a time (mixed precision policy)
    transient = 4 * a.vocab * batch * T
    if a.fused_ce:  # the forward's (chunk, V) logits buffer (~32 MB on CPU), or the backward's
        tokens = batch * T  # upstream-scaled copies of dhidden and dweight, whichever is larger
        chunk = min(tokens, max(1, (32 << 20) // (a.vocab * ab)))
        vd = a.vocab * a.dim
        fwd = chunk * a.vocab * ab + (ab * vd if autocast else 0)  # + the head's 16-bit copy, while it runs
        if ab < 4 and chunk < tokens:
            fwd += (4 + ab) * vd  # 16-bit dweight over several chunks: its fp32 accumulator and a partial
        transient = max(fwd, ab * (tokens + a.vocab) * a.dim)
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    held = grads if grad_accum > 1 or (world > 1 and zero < 3) else 0
    backward = act + copies + transient + held
    update = grads + opt // 2  # foreach AdamW's one fp32 temporary per parameter it steps
    return dict(weights=weights, grads=grads, optimizer=opt, activations=act, autocast_copies=copies,
                transient=transient, total=weights + opt + max(backward, update),
                peak_phase="backward" if backward >= update else "update")


def train_time_s(a: Arch, tokens: float, gpu: str = "H100-SXM", mfu: float = 0.4, n_gpus: int = 1,
                 precision: str = "bf16", seq_len: int | None = None) -> float:
    """Seconds to train on `tokens` tokens at model-FLOPs-utilization `mfu` on `n_gpus` of `gpu`."""
    if gpu not in GPUS:
        raise ValueError(f"gpu must be one of {sorted(GPUS)}, got {gpu!r}")
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    key = "bf16" if precision in ("bf16", "autocast-bf16", "bf16-mixed") else precision
    peak = GPUS[gpu][key if key in GPUS[gpu] else "fp32"]
    f = flops_per_token(a, seq_len or a.max_seq_len)["total"]
    return tokens * f / (mfu * peak * n_gpus)


# ---- which configuration to run ----
def _offload_gpu_bytes(a: Arch, precision: str, batch: int, seq_len: int, checkpointing: int) -> int:
    """GPU bytes with FSDP CPU offload: two blocks' gathered 16/32-bit weights and grads in flight,
    the embedding / lm_head, the activations and the logits' transient."""
    wb, gb, _, ab = PRECISIONS[precision]
    pc = param_counts(a)
    block = (pc["total"] - pc["embedding"] - pc["lm_head"]) / max(1, a.n_layers)
    in_flight = 2 * block * (min(wb, 2) + gb) + (pc["embedding"] + pc["lm_head"]) * (min(wb, 2) + gb)
    rb = 4 if precision.startswith("autocast") else ab
    return int(in_flight + activation_bytes(a, batch, seq_len, ab, checkpointing, rb) + 4 * a.vocab * batch * seq_len)


def recommend(cfg: Any, gpu_mem_gib: float, n_gpus: int = 1, batch: int = 16, seq_len: int | None = None,
              precision: str = "autocast-bf16", grad_accum: int = 1, headroom: float = 0.85) -> dict[str, Any]:
    """The fastest configuration expected to fit (see the module docstring): a dict with `name`,
    `flags` (for scripts/pretrain.py and the other stages), `launch` (the torchrun prefix), `batch`,
    `grad_accum`, `bytes` (the estimated per-GPU total), `budget` and `fits`."""
    if gpu_mem_gib <= 0:
        raise ValueError(f"gpu_mem_gib must be > 0, got {gpu_mem_gib}")
    if n_gpus < 1:
        raise ValueError(f"n_gpus must be >= 1, got {n_gpus}")
    a = arch_from_config(cfg)
    T = seq_len or a.max_seq_len
    budget = int(gpu_mem_gib * 2 ** 30 * headroom)
    launch = f"torchrun --nproc_per_node {n_gpus}" if n_gpus > 1 else "python"

    def ladder(b, accum):
        yield "DDP" if n_gpus > 1 else "single GPU", [], memory_bytes(a, precision, 0, n_gpus, b, T, 0, accum)["total"]
        yield ("DDP" if n_gpus > 1 else "single GPU") + " + activation checkpointing", ["--grad-checkpointing"], \
            memory_bytes(a, precision, 0, n_gpus, b, T, 1, accum)["total"]
        if n_gpus > 1:
            yield "FSDP2", ["--fsdp"], memory_bytes(a, precision, 3, n_gpus, b, T, 0, accum)["total"]
            yield "FSDP2 + activation checkpointing", ["--fsdp", "--grad-checkpointing"], \
                memory_bytes(a, precision, 3, n_gpus, b, T, 1, accum)["total"]
        yield "FSDP2 + CPU offload + activation checkpointing", ["--fsdp", "--fsdp-offload", "--grad-checkpointing"], \
            _offload_gpu_bytes(a, precision, b, T, 1)

    b, accum = batch, grad_accum
    while True:
        for name, flags, need in ladder(b, accum):
            if need <= budget:
                return dict(name=name, flags=flags, launch=launch, batch=b, grad_accum=accum, bytes=need,
                            budget=budget, fits=True)
        if b == 1:
            return dict(name="does not fit", flags=flags, launch=launch, batch=1, grad_accum=accum, bytes=need,
                        budget=budget, fits=False)
        b, accum = max(1, b // 2), accum * 2


def plan(cfg: Any, tokens: float = 1e9, gpu: str = "H100-SXM", mfu: float = 0.4, n_gpus: int = 1,
         precision: str = "autocast-bf16", zero: int = 0, batch: int = 16, seq_len: int | None = None,
         checkpointing: bool = False, gpu_mem_gib: float | None = None) -> dict[str, Any]:
    """Everything at once, as a dict (what scripts/plan.py prints); `recommendation` for n_gpus of
    `gpu` (or of gpu_mem_gib GiB each)."""
    a = arch_from_config(cfg)
    T = seq_len or a.max_seq_len
    mem_gib = gpu_mem_gib if gpu_mem_gib else GPUS.get(gpu, {}).get("mem_gib")
    return dict(
        recommendation=recommend(a, mem_gib, n_gpus, batch, T, precision) if mem_gib else None,
        arch=dataclasses.asdict(a),
        params=param_counts(a),
        flops_per_token=flops_per_token(a, T),
        memory={z: memory_bytes(a, precision, z, n_gpus, batch, T, checkpointing) for z in sorted({0, zero})},
        memory_by_precision={p: memory_bytes(a, p, zero, n_gpus, batch, T, checkpointing) for p in PRECISIONS},
        train_time_s=train_time_s(a, tokens, gpu, mfu, n_gpus, precision, T),
        inputs=dict(tokens=tokens, gpu=gpu, mfu=mfu, n_gpus=n_gpus, precision=precision, zero=zero, batch=batch,
                    seq_len=T, checkpointing=checkpointing, gpu_mem_gib=mem_gib),
    )


def _fmt_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(b) < 1024 or unit == "TiB":
            return f"{b:.1f} {unit}" if unit != "B" else f"{int(b)} B"
        b /= 1024
    return str(b)


def _fmt_time(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.2f} h"
    return f"{s / 86400:.2f} days"


def format_plan(p: dict[str, Any]) -> str:
    """Human-readable report."""
    a, pc, fl, inp = p["arch"], p["params"], p["flops_per_token"], p["inputs"]
    lines = [
        f"model: dim={a['dim']} layers={a['n_layers']} heads={a['n_heads']}/{a['n_kv_heads']} "
        f"head_dim={a['head_dim']} ffn={a['ffn']} vocab={a['vocab']}"
        + (f" experts={a['n_experts']}+{a['n_shared']} shared top-{a['top_k']} expert_ffn={a['expert_ffn']}"
           if a["n_experts"] else ""),
        f"parameters: total {pc['total']:,} ({pc['total'] / 1e6:.2f} M)  active/token {pc['active']:,}  "
        f"embedding {pc['embedding']:,}",
        f"training FLOPs/token at T={inp['seq_len']}: {fl['total'] / 1e6:.1f} MFLOP "
        f"(6N {fl['params'] / 1e6:.1f} + attention {fl['attention'] / 1e6:.1f})",
        f"time for {inp['tokens']:.3g} tokens on {inp['n_gpus']}x {inp['gpu']} at MFU {inp['mfu']:.0%}: "
        f"{_fmt_time(p['train_time_s'])}",
        f"memory per rank (batch {inp['batch']} x {inp['seq_len']}, world {inp['n_gpus']}, AdamW"
        f"{', checkpointing' if inp['checkpointing'] else ''}):",
        f"  {'precision':<14} {'ZeRO':>4} {'weights':>11} {'grads':>11} {'optimizer':>11} {'activations':>12} {'total':>11}",
    ]
    rows = [(inp["precision"], z, m) for z, m in p["memory"].items()]
    rows += [(prec, inp["zero"], m) for prec, m in p["memory_by_precision"].items() if prec != inp["precision"]]
    for prec, z, m in rows:
        lines.append(f"  {prec:<14} {z:>4} {_fmt_bytes(m['weights']):>11} {_fmt_bytes(m['grads']):>11} "
                     f"{_fmt_bytes(m['optimizer']):>11} {_fmt_bytes(m['activations']):>12} {_fmt_bytes(m['total']):>11}")
    r = p.get("recommendation")
    if r:
        where = f"{inp['n_gpus']}x {inp['gpu_mem_gib']:g} GiB"
        if r["fits"]:
            cmd = f"{r['launch']} scripts/pretrain.py {' '.join(r['flags'])} --batch-size {r['batch']}" + \
                  (f" --grad-accum {r['grad_accum']}" if r["grad_accum"] > 1 else "")
            lines.append(f"recommended on {where} ({inp['precision']}): {r['name']}, micro-batch {r['batch']}"
                         f" (~{_fmt_bytes(r['bytes'])} of a {_fmt_bytes(r['budget'])} budget per GPU)")
            lines.append(f"  {' '.join(cmd.split())}")
        else:
            lines.append(f"recommended on {where}: nothing fits — even {r['name'] if r['name'] != 'does not fit' else 'FSDP2 + CPU offload + checkpointing'} "
                         f"at micro-batch 1 needs ~{_fmt_bytes(r['bytes'])} (budget {_fmt_bytes(r['budget'])}); use more GPUs or a shorter --seq-len")
    return "\n".join(lines)
