"""Supervised fine-tuning from a pretrained checkpoint (loss on assistant tokens only).

CPU, bundled data:   python scripts/sft.py --init out/pretrain --out out/sft
GPU, minimind data:  python scripts/sft.py --init out/pretrain --data sft_mini_512.jsonl \
                         --tokenizer path/to/tokenizer --device cuda --dtype bf16 --seq-len 512
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain import add_train_args, shards, train_config  # noqa: E402

from llmcore.train import checkpoint  # noqa: E402
from llmcore.train.sft import sft  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(p, steps=300, batch_size=16, lr=1e-3)
    p.set_defaults(out="out/sft")
    p.add_argument("--init", required=True, help="pretrained checkpoint (directory, or an --out of pretrain.py)")
    p.add_argument("--no-pack", action="store_true", help="one conversation per row (padded) instead of packing")
    a = p.parse_args(argv)
    if a.data and not a.tokenizer:
        init = checkpoint.latest_checkpoint(a.init) or Path(a.init)
        a.tokenizer = checkpoint.load_meta(init).get("tokenizer")
    shard, tok_dir = shards(a, "sft")
    cfg = train_config(a, tokenizer=str(Path(tok_dir).resolve()), stage="sft")
    model, hist = sft(shard, a.init, cfg, seq_len=a.seq_len, pack=not a.no_pack, resume=a.resume, backend=a.backend)
    if hist["losses"]:
        print(f"sft: {hist['step']} steps, final loss {hist['losses'][-1][1]:.4f}, checkpoints in {a.out}")


if __name__ == "__main__":
    from llmcore.train.stage_cli import run_cli

    run_cli(main)
