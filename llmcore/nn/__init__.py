"""llmcore.nn — small nn.Modules over llmcore.ops."""
from llmcore.nn.nf4_linear import NF4Linear  # noqa: F401
