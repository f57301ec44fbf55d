"""Pretraining stage: next-token loss on a packed token shard (llmcore.data.prep.prepare_pretrain).

Windows of seq_len tokens (PackedPretrainDataset); documents packed in a window never attend to
each other (positions restart per document -> varlen attention). The last `eval_windows` windows
are held out for the eval loss. Everything else is the one loop (llmcore.train.loop.train).
"""
import torch
from torch.utils.data import Subset

from llmcore.data.datasets import PackedPretrainDataset, collate
from llmcore.model.config import ModelConfig
from llmcore.model.model import Transformer
from llmcore.train import checkpoint
from llmcore.train.loop import TrainConfig, lm_loss, train


def holdout_split(dataset, n_eval: int):
    """(train, eval) Subsets: the last n_eval items are held out (at most a tenth of the data)."""
    n_eval = min(n_eval, len(dataset) // 10)
    n = len(dataset)
    return Subset(dataset, range(n - n_eval)), (Subset(dataset, range(n - n_eval, n)) if n_eval else None)


def moe_bias_hook(gamma: float):
    """after_step hook for aux-loss-free MoE balancing: update every router's selection bias."""
    def hook(step, model):
        import torch.distributed as dist

        for m in model.modules():
            if hasattr(m, "update_bias") and getattr(m, "balance", "") == "bias":
                if dist.is_initialized() and dist.get_world_size() > 1:  # every rank: the global load
                    dist.all_reduce(m.expert_load)
                m.update_bias(gamma)
    return hook


def pretrain(shard_dir, model_cfg: ModelConfig, cfg: TrainConfig, seq_len: int = 256, eval_windows: int = 64,
             resume: bool = False, init_from=None, moe_bias_gamma: float = 1e-3):
    """Build (or load from `init_from`) the model and pretrain it. Returns (model, history)."""
    torch.manual_seed(cfg.seed)
    model = checkpoint.load_model(init_from, backend=model_cfg.backend) if init_from else Transformer(model_cfg)
    data = PackedPretrainDataset(shard_dir, seq_len, seed=cfg.seed)
    train_ds, eval_ds = holdout_split(data, eval_windows)
    hook = moe_bias_hook(moe_bias_gamma) if model.cfg.n_experts and model.cfg.moe_balance == "bias" else None
    history = train(model, train_ds, cfg, lm_loss, eval_ds, collate=collate, resume=resume, after_step=hook)
    return model, history
