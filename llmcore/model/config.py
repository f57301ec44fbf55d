"""Model configuration: one dataclass and the named presets.

    tiny            CPU demos and tests (dim 256, 4 layers, 4 heads / 2 kv heads, head_dim 64)
    minimind-26m    minimind's default dense model (dim 512, 8 layers, 8 / 2 heads, ffn 1408)
    minimind-104m   minimind's larger dense model (dim 768, 16 layers)
    minimind-moe    minimind's MoE (dim 640, 8 layers, 4 routed experts top-2 + 1 shared)
    minimind-3      minimind-3 (2026-04, Qwen3-shaped): dim 768, 8 layers, 8 / 4 heads, QK-norm,
                    ffn 2432, vocab 6400, tied, theta 1e6 — 64M parameters
    minimind-3-moe  its MoE: 4 experts, top-1, no shared expert — 198M total / 64M active

ffn_hidden=0 means minimind's rule: 64 * ceil(int(dim * 8 / 3) / 64). head_dim=0 means dim // n_heads.

The options beyond minimind2's shape, each the math of a transformers family (tests hold them to it):
    qk_norm          RMSNorm over head_dim on every q and k head before RoPE (Qwen3, minimind-3)
    tie_embeddings   False: a separate lm_head (output.weight)
    attn_bias        q/k/v projections carry a bias (Qwen2); attn_out_bias: o too (Llama attention_bias)
    head_dim         independent of dim / n_heads (Qwen3: 128)
    rope_scaling     transformers' rope_parameters beyond theta: {"rope_type": "linear" | "dynamic" |
                     "yarn" | "llama3", ...its keys}, computed as transformers computes them
                     (llmcore.ops.rope_frequencies); "max_position_embeddings" is the model's trained
                     length (dynamic / yarn read it)
    sliding_window   Mistral's window (0 = none); llmcore has no windowed kernel, so a forward over
                     more tokens than the window raises instead of computing something else
    moe_renormalize  top-k weights renormalized to sum 1 (Mixtral, Qwen3-MoE norm_topk_prob); False:
                     the softmax probabilities as they are (Qwen2-MoE's default)
    shared_expert_gate  the shared expert's output scaled by sigmoid(x @ g) per token (Qwen2-MoE)
    fused_ce         with labels, the loss comes from llmcore.ops.fused_linear_cross_entropy (chunked:
                     the (B, S, V) logits are never materialized, and forward returns logits=None).
                     Backend "llmcore" only: the torch backend stays the plain-PyTorch baseline
                     (F.linear + F.cross_entropy), as does fused_ce=False.
"""
import dataclasses
from dataclasses import dataclass


@dataclass
class ModelConfig:
    vocab_size: int = 6400
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 2
    ffn_hidden: int = 0
    max_seq_len: int = 512          # rope tables are built for this many positions (grown on demand)
    rope_theta: float = 1e6
    norm_eps: float = 1e-5
    tie_embeddings: bool = True     # lm_head = embed.weight; False: a separate output.weight
    head_dim: int = 0               # 0 = dim // n_heads
    qk_norm: bool = False           # per-head RMSNorm on q and k before RoPE (Qwen3)
    attn_bias: bool = False         # bias on q/k/v (Qwen2)
    attn_out_bias: bool = False     # bias on o (Llama attention_bias=True sets both)
    rope_scaling: dict = None       # transformers' rope_parameters (rope_type linear/dynamic/yarn/llama3)
    sliding_window: int = 0         # Mistral's window; 0 = none (longer sequences are refused)
    n_experts: int = 0              # routed experts; 0 = dense SwiGLU MLP in every layer
    n_shared_experts: int = 0
    shared_expert_gate: bool = False  # sigmoid(x @ g) * shared(x) (Qwen2-MoE)
    top_k: int = 2
    moe_renormalize: bool = True    # top-k weights renormalized (norm_topk_prob)
    moe_score: str = "softmax"      # router scores: "softmax" | "sigmoid"
    aux_loss_coef: float = 0.01
    moe_balance: str = "aux"        # "aux" (Switch aux loss) | "bias" (aux-loss-free) | "none"
    init_std: float = 0.02
    backend: str = "llmcore"        # "llmcore" (llmcore.ops) | "torch" (plain PyTorch baseline)
    fused_ce: bool = True           # training loss through fused_linear_cross_entropy (no (B, S, V) logits)

    def __post_init__(self):
        if self.ffn_hidden <= 0:
            self.ffn_hidden = 64 * ((int(self.dim * 8 / 3) + 63) // 64)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) % n_kv_heads ({self.n_kv_heads}) must be 0")
        if self.head_dim <= 0:
            if self.dim % self.n_heads:
                raise ValueError(f"dim ({self.dim}) % n_heads ({self.n_heads}) must be 0 unless head_dim is given")
            self.head_dim = self.dim // self.n_heads
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        if self.backend not in ("llmcore", "torch"):
            raise ValueError(f"backend must be 'llmcore' or 'torch', got {self.backend!r}")
        if self.rope_scaling:
            from llmcore.ops.rope import ROPE_TYPES

            kind = self.rope_scaling.get("rope_type", "default")
            if kind not in ROPE_TYPES:
                raise ValueError(f"rope_scaling rope_type must be one of {ROPE_TYPES}, got {kind!r}")
        if self.sliding_window < 0:
            raise ValueError(f"sliding_window must be >= 0 (0 = none), got {self.sliding_window}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


PRESETS = {
    "tiny": dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=6400, max_seq_len=256),
    "minimind-26m": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, vocab_size=6400, max_seq_len=512),
    "minimind-104m": dict(dim=768, n_layers=16, n_heads=8, n_kv_heads=2, vocab_size=6400, max_seq_len=512),
    "minimind-moe": dict(dim=640, n_layers=8, n_heads=8, n_kv_heads=2, vocab_size=6400, max_seq_len=512,
                         n_experts=4, n_shared_experts=1, top_k=2),
    "minimind-3": dict(dim=768, n_layers=8, n_heads=8, n_kv_heads=4, ffn_hidden=2432, vocab_size=6400,
                       max_seq_len=512, rope_theta=1e6, qk_norm=True),
    "minimind-3-moe": dict(dim=768, n_layers=8, n_heads=8, n_kv_heads=4, ffn_hidden=2432, vocab_size=6400,
                           max_seq_len=512, rope_theta=1e6, qk_norm=True, n_experts=4, top_k=1),
}


def get_config(preset: str = "tiny", **overrides) -> ModelConfig:
    """A preset by name, with field overrides (e.g. get_config("tiny", backend="torch"))."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[preset], **overrides})
