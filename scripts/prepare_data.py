"""jsonl -> pre-tokenized packed shards (tokens.bin [+ mask.bin] + docs.npy + meta.json).

    python scripts/prepare_data.py --default --workdir out/data     # whole default corpus: corpus,
                                                                    # tokenizer and every shard
    python scripts/prepare_data.py --kind pretrain --data pretrain.jsonl --tokenizer out/tok --out out/pt
    python scripts/prepare_data.py --kind sft --data sft.jsonl --tokenizer out/tok --out out/sft --skip-bad
"""
import argparse
import json
import sys
import time

from llmcore.data.prep import prepare_default_data, prepare_dpo, prepare_pretrain, prepare_sft

PREPARE = {"pretrain": prepare_pretrain, "sft": prepare_sft, "reason": prepare_sft, "dpo": prepare_dpo}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--default", action="store_true", help="generate + tokenize + prepare the bundled corpus")
    ap.add_argument("--workdir", default="out/data", help="with --default: output root (default: %(default)s)")
    ap.add_argument("--size", default="small", choices=["tiny", "micro", "small", "large"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=6400)
    ap.add_argument("--force", action="store_true", help="with --default: redo even if up to date")
    ap.add_argument("--kind", choices=sorted(PREPARE), help="data format (reason = SFT format)")
    ap.add_argument("--data", nargs="+", help="input jsonl files")
    ap.add_argument("--tokenizer", help="tokenizer directory (scripts/train_tokenizer.py)")
    ap.add_argument("--out", help="output shard directory")
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed lines instead of failing")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.default:
        r = prepare_default_data(args.workdir, seed=args.seed, size=args.size, vocab_size=args.vocab_size,
                                 num_workers=args.num_workers, progress=not args.no_progress, force=args.force)
        for k in ("pretrain", "sft", "reason", "dpo", "eval_dpo"):
            m = json.loads((r[k] / "meta.json").read_text())
            print(f"{k:9s} {m['num_docs']:8d} docs {m['num_tokens']:10d} tokens -> {r[k]}")
        print(f"tokenizer {r['tokenizer']} -> {r['tokenizer_dir']}; done in {time.perf_counter() - t0:.1f}s")
        return
    missing = [n for n in ("kind", "data", "tokenizer", "out") if getattr(args, n) is None]
    if missing:
        ap.error("without --default, give " + ", ".join("--" + m for m in missing))
    try:
        st = PREPARE[args.kind](args.data, args.tokenizer, args.out, num_workers=args.num_workers,
                                strict=not args.skip_bad, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"{args.kind}: {st['num_docs']} docs, {st['num_tokens']} tokens, {st['num_bad']} malformed line(s) skipped, "
          f"{time.perf_counter() - t0:.1f}s -> {args.out}")


if __name__ == "__main__":
    main()
