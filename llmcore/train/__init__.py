"""llmcore.train — the one training loop (loop.py), checkpoints, optimizer, and thin stages."""
from llmcore.train.loop import TrainConfig, evaluate, lm_loss, train  # noqa: F401
