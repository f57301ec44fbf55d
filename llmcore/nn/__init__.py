"""llmcore.nn — small nn.Modules over llmcore.ops, each with a backend switch "llmcore" | "torch"."""
from llmcore.nn.attention import Attention, AttnMeta  # noqa: F401
from llmcore.nn.mlp import MLP  # noqa: F401
from llmcore.nn.norm import RMSNorm  # noqa: F401
from llmcore.nn.rotary import Rotary  # noqa: F401
from llmcore.nn.nf4_linear import NF4Linear  # noqa: F401
from llmcore.nn.moe import MoEFeedForward  # noqa: F401
