"""Export an llmcore checkpoint to a transformers directory (or import one back).

    python scripts/export_hf.py out/sft out/hf                        # dense -> LlamaForCausalLM
    python scripts/export_hf.py out/moe out/hf-moe                    # MoE -> Qwen2-MoE / Mixtral
    python scripts/export_hf.py out/sft out/hf --lora out/lora/adapter --dtype bf16   # LoRA merged
    python scripts/export_hf.py --import out/hf out/ckpt-from-hf      # transformers dir -> llmcore checkpoint
Then: transformers.AutoModelForCausalLM.from_pretrained("out/hf") (offline) gives our logits.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="llmcore checkpoint / training output dir (or, with --import, a transformers dir)")
    ap.add_argument("out", help="output directory")
    ap.add_argument("--import", dest="import_", action="store_true", help="transformers dir -> llmcore checkpoint")
    ap.add_argument("--tokenizer", help="tokenizer directory (default: found next to the checkpoint)")
    ap.add_argument("--lora", help="PEFT adapter directory to merge into the exported weights")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--check", action="store_true", help="reload with transformers and compare logits")
    args = ap.parse_args(argv)
    if args.import_:
        from llmcore.export.hf import import_hf
        from llmcore.train.checkpoint import save_checkpoint

        model, tok = import_hf(args.src)
        ck = save_checkpoint(args.out, 0, model, meta={"imported_from": str(args.src)}, keep_last=0)
        if tok is not None:
            tok.save(Path(args.out) / "tokenizer")
        print(f"imported {args.src} -> {ck} ({model.num_params():,} parameters)")
        return ck
    from llmcore.export.hf import export_hf, hf_architecture
    from llmcore.export.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(args.src, args.tokenizer)
    if tok is None:
        print("warning: no tokenizer found (use --tokenizer); exporting weights only", file=sys.stderr)
    out = export_hf(model, args.out, tokenizer=tok, dtype=DTYPES[args.dtype], lora_dir=args.lora)
    print(f"exported {hf_architecture(model.cfg)} ({model.num_params():,} parameters, {args.dtype}) -> {out}")
    if args.check:
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        ids = torch.randint(3, model.cfg.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            diff = (hf(ids).logits - model(ids)).abs().max().item()
        print(f"max |logit difference| vs transformers: {diff:.3g}")
    return out


if __name__ == "__main__":
    main()
