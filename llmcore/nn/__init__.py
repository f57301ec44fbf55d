"""llmcore.nn — small nn.Modules over llmcore.ops."""
from llmcore.nn.moe import MoEFeedForward  # noqa: F401
