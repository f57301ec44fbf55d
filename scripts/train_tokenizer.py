"""Train the byte-level BPE tokenizer (fixed special ids, ChatML template) on jsonl files.

    python scripts/train_tokenizer.py                        # on the bundled default corpus
    python scripts/train_tokenizer.py --data a.jsonl b.jsonl --vocab-size 6400 --out out/tokenizer
"""
import argparse
import time
from pathlib import Path

from llmcore.data.corpus import write_default_corpus
from llmcore.data.tokenizer import train_tokenizer


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", help="jsonl files (pretrain {text} / SFT {conversations} / DPO); "
                    "default: the bundled corpus, generated into --workdir")
    ap.add_argument("--workdir", default="out/data", help="where the bundled corpus is generated (default: %(default)s)")
    ap.add_argument("--size", default="small", choices=["tiny", "micro", "small", "large"], help="bundled corpus size")
    ap.add_argument("--seed", type=int, default=0, help="bundled corpus seed")
    ap.add_argument("--vocab-size", type=int, default=6400)
    ap.add_argument("--out", default=None, help="output directory (default: <workdir>/tokenizer)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.data:
        paths = args.data
    else:
        corpus = write_default_corpus(Path(args.workdir) / "corpus", seed=args.seed, size=args.size)
        paths = [corpus["pretrain"], corpus["sft"], corpus["reason"]]
        print(f"generated the default corpus ({args.size}, seed {args.seed}) in {Path(args.workdir) / 'corpus'}")
    out = args.out or str(Path(args.workdir) / "tokenizer")
    tok = train_tokenizer(paths, vocab_size=args.vocab_size, out_dir=out)
    print(f"trained {tok} on {len(paths)} file(s) in {time.perf_counter() - t0:.1f}s -> {out}")


if __name__ == "__main__":
    from llmcore.train.stage_cli import run_cli

    run_cli(main)
