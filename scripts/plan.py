"""Compute / memory / time planner: parameters, FLOPs per token, training memory per precision and
ZeRO/FSDP stage, and time to train D tokens at a given MFU on a named GPU.

    python scripts/plan.py minimind-26m --tokens 2e9 --gpu H100-SXM --mfu 0.35
    python scripts/plan.py minimind-moe --gpus 8 --zero 3 --batch 32 --seq-len 512 --precision bf16
    python scripts/plan.py out/sft/ckpt-00001000        # a checkpoint's config (meta.json)
    python scripts/plan.py tiny --dim 1024 --n-layers 24 # a preset with overrides
    python scripts/plan.py minimind-104m --gpus 4 --gpu-mem 8 --batch 64 --seq-len 2048
        # ... ends with the recommended configuration (DDP / FSDP2 / + offload / + checkpointing) and its command
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmcore.plan import GPUS, PRECISIONS, format_plan, plan  # noqa: E402


def load_config(spec, overrides):
    from llmcore.model.config import PRESETS, ModelConfig, get_config

    if spec in PRESETS:
        return get_config(spec, **overrides)
    p = Path(spec)
    if p.is_dir() and not (p / "meta.json").exists() and not (p / "config.json").exists():
        from llmcore.train.checkpoint import latest_checkpoint

        p = latest_checkpoint(p) or p
    for f in (p / "meta.json", p / "config.json", p):
        if f.is_file():
            d = json.loads(f.read_text())
            d = d.get("model_config", d)
            if "hidden_size" in d:  # a transformers config
                return {**d, **overrides}
            return ModelConfig.from_dict({**d, **overrides})
    sys.exit(f"{spec}: not a preset ({', '.join(PRESETS)}) nor a checkpoint/config file")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="preset name, checkpoint directory, or config json")
    ap.add_argument("--tokens", type=float, default=1e9, help="training tokens D")
    ap.add_argument("--gpu", default="H100-SXM", choices=sorted(GPUS))
    ap.add_argument("--gpus", type=int, default=1, help="number of GPUs (data-parallel world size)")
    ap.add_argument("--gpu-mem", type=float, default=None, help="GiB per GPU for the recommendation "
                    "(default: the --gpu's memory)")
    ap.add_argument("--mfu", type=float, default=0.4)
    ap.add_argument("--precision", default="autocast-bf16", choices=list(PRECISIONS))
    ap.add_argument("--zero", type=int, default=0, choices=[0, 1, 2, 3], help="ZeRO stage (3 = FSDP full shard)")
    ap.add_argument("--batch", type=int, default=16, help="micro-batch (sequences per GPU)")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing of every layer")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden", "n_experts", "top_k",
                 "n_shared_experts", "max_seq_len"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, dest=name, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    over = {k: getattr(args, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden",
                                          "n_experts", "top_k", "n_shared_experts", "max_seq_len")
            if getattr(args, k) is not None}
    cfg = load_config(args.config, over)
    p = plan(cfg, tokens=args.tokens, gpu=args.gpu, mfu=args.mfu, n_gpus=args.gpus, precision=args.precision,
             zero=args.zero, batch=args.batch, seq_len=args.seq_len, checkpointing=args.checkpointing,
             gpu_mem_gib=args.gpu_mem)
    print(json.dumps(p, indent=2) if args.json else format_plan(p))
    return p


if __name__ == "__main__":
    main()
