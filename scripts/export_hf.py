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
CHECK_PROMPTS, CHECK_LEN = 8, 64


@torch.no_grad()
def logit_check(model, hf) -> tuple[float, float]:
    """(max |our logits - transformers' logits|, max |logit|) over CHECK_PROMPTS random token
    sequences of CHECK_LEN tokens (ids 3..vocab, seeds 0..CHECK_PROMPTS-1), both models in fp32."""
    model = model.float().eval()
    diff = scale = 0.0
    for seed in range(CHECK_PROMPTS):
        ids = torch.randint(3, model.cfg.vocab_size, (1, min(CHECK_LEN, model.cfg.max_seq_len)),
                            generator=torch.Generator().manual_seed(seed))
        ours = model(ids)
        diff = max(diff, (hf(ids).logits - ours).abs().max().item())
        scale = max(scale, ours.abs().max().item())
    return diff, scale


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
        meta = {"imported_from": str(Path(args.src).resolve())}
        if tok is not None:  # beside the checkpoint, and recorded so every stage uses it
            meta["tokenizer"] = str(tok.save(Path(args.out) / "tokenizer").resolve())
        ck = save_checkpoint(args.out, 0, model, meta=meta, keep_last=0)
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
        diff, scale = logit_check(model, hf)
        print(f"--check: max |logit difference| vs transformers {diff:.3g} (largest |logit| {scale:.3g}) over "
              f"{CHECK_PROMPTS} random prompts x {CHECK_LEN} tokens (seeds 0-{CHECK_PROMPTS - 1}), fp32 forward")
    return out


if __name__ == "__main__":
    from llmcore.train.stage_cli import run_cli

    run_cli(main)
