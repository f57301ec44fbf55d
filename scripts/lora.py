"""LoRA / QLoRA fine-tuning of an SFT checkpoint (PEFT-format adapter out; optional merged checkpoint).

    python scripts/lora.py --init out/sft --out out/lora                 # LoRA on the bundled SFT data
    python scripts/lora.py --init out/sft --out out/qlora --qlora        # NF4 base (double quant) + LoRA
    python scripts/lora.py --init out/sft --out out/lora --targets wq,wv --r 16 --alpha 32 --rslora --merge

Writes <out>/adapter/{adapter_config.json, adapter_model.safetensors} (peft.PeftModel.from_pretrained
loads it onto the HF export), loop checkpoints in <out>, and with --merge <out>/merged (plain weights).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmcore.nn.lora import DEFAULT_TARGETS, merge_lora  # noqa: E402
from llmcore.train import stage_cli  # noqa: E402
from llmcore.train.chatdata import ChatDataset  # noqa: E402
from llmcore.train.lora import prepare_lora, train_lora, trainable_summary  # noqa: E402


def main(argv=None):
    p = stage_cli.add_common_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="comma-separated linear names")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--rslora", action="store_true")
    p.add_argument("--qlora", action="store_true", help="NF4 (double-quant) frozen base, bf16 compute")
    p.add_argument("--merge", action="store_true", help="also write <out>/merged: base + adapters folded in")
    args = p.parse_args(argv)
    tok, data, ev = stage_cli.default_data(args, "sft", None)
    model = stage_cli.load_init(args.init, args.device)
    print(stage_cli.memory_report("base loaded", model))
    prepare_lora(model, args.targets.split(","), args.r, args.alpha, args.dropout, args.rslora, qlora=args.qlora)
    print(stage_cli.memory_report("qlora: NF4 base + adapters" if args.qlora else "lora: base + adapters", model))
    print(trainable_summary(model))
    cfg = stage_cli.train_config(args, 1e-3, tok=tok, stage="lora")
    hist = train_lora(model, ChatDataset(data, tok, args.max_len, args.skip_bad), cfg)
    print(f"trained {hist['step']} steps in {hist['seconds']:.1f}s, final loss {hist['losses'][-1][1]:.4f}")
    print(stage_cli.memory_report("after training"))
    print(f"adapter: {args.out}/adapter")
    if args.merge:
        merge_lora(model)
        print(f"merged: {stage_cli.save_plain(model, Path(args.out) / 'merged', hist['step'], cfg.extra_meta)}")
    return hist


if __name__ == "__main__":
    stage_cli.run_cli(main)
