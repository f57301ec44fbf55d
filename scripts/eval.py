"""Evaluate a model: perplexity on text, multiple-choice accuracy on C-Eval / CMMLU csv files,
held-out question accuracy on the bundled corpus' eval.jsonl (per split, beside its baselines).

    python scripts/eval.py out/sft --ppl out/data/corpus/eval.jsonl      # perplexity (jsonl "text" or .txt)
    python scripts/eval.py out/sft --choice                              # the bundled sample csv
    python scripts/eval.py out/hf --choice path/to/ceval/val/ --mode text_norm --chat
    python scripts/eval.py out/quickstart/dpo --qa out/quickstart/data/corpus/eval.jsonl \
        --control out/quickstart/sft_control                             # held-out questions, per split
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
    ap.add_argument("--qa", help="held-out questions (eval.jsonl of the bundled corpus): greedy answers scored "
                    "with the strict first-span rule, per split, beside the relation-prior guess (from facts.jsonl)")
    ap.add_argument("--facts", help="facts.jsonl for the relation prior (default: next to --qa)")
    ap.add_argument("--control", help="also score this model (e.g. <quickstart out>/sft_control: SFT without pretraining)")
    ap.add_argument("--json", help="also write the results to this json file")
    ap.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed jsonl lines instead of failing")
    args = ap.parse_args(argv)
    if args.ppl is None and args.choice is None and args.qa is None:
        ap.error("give --ppl FILE..., --choice [CSV...] and/or --qa eval.jsonl")
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
    if args.qa is not None:
        results["qa"] = heldout_by_split(model, tok, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, ensure_ascii=False))
    return results


def heldout_by_split(model, tok, args):
    """{column: {split: accuracy}} for the model, the relation prior and the optional control."""
    from llmcore.data.corpus import format_split_table, prior_accuracy, split_accuracy
    from llmcore.data.jsonl import read_jsonl
    from llmcore.export.loading import load_model_and_tokenizer
    from llmcore.train.sft import heldout_accuracy, read_eval

    records = read_eval(args.qa, limit=args.limit or 0, skip_bad=args.skip_bad)
    facts = Path(args.facts) if args.facts else Path(args.qa).with_name("facts.jsonl")
    cols = {}
    if facts.exists():
        cols["relation prior"] = prior_accuracy(records, read_jsonl(facts, "json"))
    else:
        print(f"no {facts}: the relation-prior baseline is not shown (pass --facts)")
    _, rows = heldout_accuracy(model, tok, records)
    cols["model"] = split_accuracy(records, [ok for *_, ok in rows])
    if args.control:
        control, ctok = load_model_and_tokenizer(args.control, args.tokenizer)
        _, rows = heldout_accuracy(control, ctok or tok, records)
        cols["control"] = split_accuracy(records, [ok for *_, ok in rows])
    print("held-out accuracy (strict first-span exact match), per split:")
    print("\n".join(format_split_table(records, list(cols.items()))))
    return cols


if __name__ == "__main__":
    from llmcore.train.stage_cli import run_cli

    run_cli(main)
