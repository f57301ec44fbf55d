"""DPO on preference pairs (minimind's dpo jsonl: {"chosen": [...], "rejected": [...]}).

    python scripts/dpo.py --init out/sft --out out/dpo                  # full model, frozen copy as reference
    python scripts/dpo.py --init out/sft --out out/dpo_lora --lora      # LoRA policy, adapters-off reference

Prints held-out preference accuracy (log p(chosen) > log p(rejected)) before and after; logs reward
margins and reward accuracy per step (<out>/log.jsonl).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmcore.nn.lora import merge_lora, save_adapter  # noqa: E402
from llmcore.train import stage_cli  # noqa: E402
from llmcore.train.chatdata import PairDataset  # noqa: E402
from llmcore.train.dpo import preference_accuracy, train_dpo  # noqa: E402
from llmcore.train.lora import prepare_lora  # noqa: E402


def main(argv=None):
    p = stage_cli.add_common_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (r 8, alpha 16) instead of all weights")
    p.set_defaults(batch_size=8, steps=100)
    args = p.parse_args(argv)
    tok, data, ev = stage_cli.default_data(args, "dpo", "eval_dpo")
    if ev is None:
        data, ev = stage_cli.holdout(data, 64, "held-out preference accuracy", args.skip_bad)
    else:
        print(f"held-out preference accuracy on {ev}")
    model = stage_cli.load_init(args.init, args.device)
    eval_set = PairDataset(ev, tok, args.max_len, args.skip_bad)
    before = preference_accuracy(model, eval_set, device=args.device)
    print(f"held-out preference accuracy before DPO: {before[0]:.3f} (mean log-prob margin {before[1]:+.3f})")
    if args.lora:
        prepare_lora(model)
    cfg = stage_cli.train_config(args, 1e-4 if not args.lora else 5e-4, tok=tok, stage="dpo")
    hist = train_dpo(model, PairDataset(data, tok, args.max_len, args.skip_bad), cfg, beta=args.beta, label_smoothing=args.label_smoothing)
    after = preference_accuracy(model, eval_set, device=args.device)
    print(f"held-out preference accuracy after DPO:  {after[0]:.3f} (mean log-prob margin {after[1]:+.3f})")
    print(f"{hist['step']} steps in {hist['seconds']:.1f}s; {stage_cli.memory_report('dpo')}")
    if args.lora:
        save_adapter(model, Path(args.out) / "adapter")
        merge_lora(model)
        print(f"merged: {stage_cli.save_plain(model, Path(args.out) / 'merged', hist['step'], cfg.extra_meta)}")
    return {"before": before, "after": after, "history": hist}


if __name__ == "__main__":
    stage_cli.run_cli(main)
