"""llmcore.model — config presets, the flat Llama-style model, and generation."""
from llmcore.model.config import PRESETS, ModelConfig, get_config  # noqa: F401
from llmcore.model.model import KVCache, Transformer, build_model  # noqa: F401
