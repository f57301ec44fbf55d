"""Model configuration: one dataclass and the named presets.

    tiny            CPU demos and tests (dim 256, 4 layers, 4 heads / 2 kv heads, head_dim 64)
    minimind-26m    minimind's default dense model (dim 512, 8 layers, 8 / 2 heads, ffn 1408)
    minimind-104m   minimind's larger dense model (dim 768, 16 layers)
    minimind-moe    minimind's MoE (dim 640, 8 layers, 4 routed experts top-2 + 1 shared)

ffn_hidden=0 means minimind's rule: 64 * ceil(int(dim * 8 / 3) / 64).
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
    tie_embeddings: bool = True     # lm_head = embed.weight (the only supported mode)
    n_experts: int = 0              # routed experts; 0 = dense SwiGLU MLP in every layer
    n_shared_experts: int = 0
    top_k: int = 2
    moe_score: str = "softmax"      # router scores: "softmax" | "sigmoid"
    aux_loss_coef: float = 0.01
    moe_balance: str = "aux"        # "aux" (Switch aux loss) | "bias" (aux-loss-free) | "none"
    init_std: float = 0.02
    backend: str = "llmcore"        # "llmcore" (llmcore.ops) | "torch" (plain PyTorch baseline)

    def __post_init__(self):
        if self.ffn_hidden <= 0:
            self.ffn_hidden = 64 * ((int(self.dim * 8 / 3) + 63) // 64)
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim ({self.dim}) % n_heads ({self.n_heads}) and n_heads % n_kv_heads "
                             f"({self.n_kv_heads}) must be 0")
        if self.backend not in ("llmcore", "torch"):
            raise ValueError(f"backend must be 'llmcore' or 'torch', got {self.backend!r}")
        if not self.tie_embeddings:
            raise ValueError("only tied embeddings are supported (tie_embeddings=True)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

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
}


def get_config(preset: str = "tiny", **overrides) -> ModelConfig:
    """A preset by name, with field overrides (e.g. get_config("tiny", backend="torch"))."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[preset], **overrides})
