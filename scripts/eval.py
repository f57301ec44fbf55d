"""Evaluate a model: perplexity on text, multiple-choice accuracy on C-Eval / CMMLU csv files.

    python scripts/eval.py out/sft --ppl out/data/corpus/eval.jsonl      # perplexity (jsonl "text" or .txt)
    python scripts/eval.py out/sft --choice                              # the bundled sample csv
    python scripts/eval.py out/hf --choice path/to/ceval/val/ --mode text_norm --chat
The model may be an llmcore checkpoint, a training output dir, or a transformers dir from export_hf.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None):
    from llmcore.eval import SAMPLE_CSV
    from llmcore.eval.choice import MODES, evaluate, format_table, read_subjects
    from llmcore.eval.perplexity import perplexity, read_texts
    from llmcore.export.loading import load_model_and_tokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="llmcore checkpoint / training output dir / transformers dir")
    ap.add_argument("--tokenizer", help="tokenizer directory (default: found next to the model)")
    ap.add_argument("--ppl", nargs="*", default=None, help=".jsonl or .txt files for perplexity")
    ap.add_argument("--field", help="jsonl field holding the text (default: text / conversations)")
    ap.add_argument("--max-len", type=int, default=None, help="window length (default: the model's max_seq_len)")
    ap.add_argument("--stride", type=int, default=None, help="sliding-window stride (default: max-len)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N documents / questions per subject")
    ap.add_argument("--choice", nargs="*", default=None,
                    help="C-Eval/CMMLU csv files or directories (no value: the bundled sample)")
    ap.add_argument("--mode", default="letter", choices=MODES)
    ap.add_argument("--chat", action="store_true", help="wrap multiple-choice prompts in the chat template")
    ap.add_argument("--json", help="also write the results to this json file")
    ap.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed jsonl lines instead of failing")
    args = ap.parse_args(argv)
    if args.ppl is None and args.choice is None:
        ap.error("give --ppl FILE... and/or --choice [CSV...]")
    model, tok = load_model_and_tokenizer(args.model, args.tokenizer)
    if tok is None:
        sys.exit("no tokenizer found next to the model: pass --tokenizer DIR")
    results = {}
    if args.ppl is not None:
        if not args.ppl:
            ap.error("--ppl needs at least one file")
        max_len = args.max_len or model.cfg.max_seq_len
        rows = []
        for f in args.ppl:
            texts = read_texts(f, args.field, args.skip_bad)[: args.limit]
            r = perplexity(model, texts, tok, max_len=max_len, stride=args.stride)
            results[f"ppl:{f}"] = r
            rows.append((f, r))
        print(f"{'file':<40} {'docs':>6} {'tokens':>9} {'nll':>8} {'ppl':>10}")
        for f, r in rows:
            print(f"{str(f)[-40:]:<40} {r['documents']:>6} {r['tokens']:>9} {r['nll']:>8.4f} {r['ppl']:>10.3f}")
    if args.choice is not None:
        subjects = {}
        for src in (args.choice or [str(SAMPLE_CSV)]):
            subjects.update(read_subjects(src))
        if args.limit:
            subjects = {k: v[: args.limit] for k, v in subjects.items()}
        r = evaluate(model, tok, subjects, mode=args.mode, chat=args.chat)
        results["choice"] = r
        print(format_table(r))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, ensure_ascii=False))
    return results


if __name__ == "__main__":
    from llmcore.train.stage_cli import run_cli

    run_cli(main)
