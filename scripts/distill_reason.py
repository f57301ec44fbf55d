"""Reasoning distillation: SFT on <think>…</think><answer>…</answer> replies with the four tag tokens
weighted x10 in the loss (minimind train_distill_reason.py), then the format rate on held-out prompts.

    python scripts/distill_reason.py --init out/sft --out out/reason
    python scripts/distill_reason.py --init out/sft --out out/reason --data my_r1_data.jsonl --tag-weight 10
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmcore.train import stage_cli  # noqa: E402
from llmcore.train.chatdata import ChatDataset, read_jsonl  # noqa: E402
from llmcore.train.reason import format_rate, greedy_reply, split_reasoning, train_reason  # noqa: E402


def main(argv=None):
    p = stage_cli.add_common_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--tag-weight", type=float, default=10.0)
    p.add_argument("--eval-n", type=int, default=50, help="held-out prompts for the format rate")
    args = p.parse_args(argv)
    tok, data, ev = stage_cli.default_data(args, "reason", "eval_reason")
    if ev is None:
        data, ev = stage_cli.holdout(data, args.eval_n, "the format rate and answer accuracy", args.skip_bad)
    else:
        print(f"format rate and answer accuracy on {ev} (question/answer or conversation records)")
    model = stage_cli.load_init(args.init, args.device)
    cfg = stage_cli.train_config(args, 1e-3, tok=tok, stage="reason")
    hist = train_reason(model, ChatDataset(data, tok, args.max_len, args.skip_bad), cfg, tok, args.tag_weight)
    recs = read_jsonl(ev, "eval", args.skip_bad)[: args.eval_n]
    rate, acc = format_rate(model, tok, recs, device=args.device)
    print(f"held-out format rate {rate:.3f}, answer accuracy {acc:.3f} ({len(recs)} prompts)")
    think, answer = split_reasoning(greedy_reply(model, tok, [{"role": "user", "content": recs[0]["question"]}],
                                                 device=args.device))
    print(f"Q: {recs[0]['question']}\n[think] {think}\n[answer] {answer}")
    print(f"{hist['step']} steps in {hist['seconds']:.1f}s; {stage_cli.memory_report('reason')}")
    with open(Path(args.out) / "format_rate.json", "w") as f:
        json.dump({"format_rate": rate, "accuracy": acc, "n": len(recs)}, f)
    return {"format_rate": rate, "accuracy": acc, "history": hist}


if __name__ == "__main__":
    stage_cli.run_cli(main)
