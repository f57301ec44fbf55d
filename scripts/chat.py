"""Chat with a trained checkpoint: interactive with streaming output, or one-shot --prompt.

    python scripts/chat.py --ckpt out/sft
    python scripts/chat.py --ckpt out/sft --prompt "What is the capital of Velora?"
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from llmcore.export.loading import load_model_and_tokenizer  # noqa: E402
from llmcore.model.generate import stream_text  # noqa: E402


# a reasoning reply (<think>…</think><answer>…</answer>) shows its think part apart from the answer
_SHOW = {"<think>": "[think] ", "</think>": "\n[answer] ", "<answer>": "", "</answer>": ""}


def reply(model, tok, messages, a):
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    text = ""
    for piece in stream_text(model, tok, ids, a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                             top_p=a.top_p, repetition_penalty=a.repetition_penalty,
                             stop_tokens=(tok.im_end_id, tok.eos_id)):
        shown = piece
        for tag, rep in _SHOW.items():
            shown = shown.replace(tag, rep)
        print(shown, end="", flush=True)
        text += piece
    print()
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="out/sft", help="checkpoint directory, training --out (its latest checkpoint; "
                   "LoRA/QLoRA runs are merged), or a transformers directory (export_hf.py)")
    p.add_argument("--tokenizer", help="default: the one recorded in the checkpoint")
    p.add_argument("--prompt", help="answer this once and exit")
    p.add_argument("--system", default="")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--history", action="store_true", help="keep the conversation (multi-turn)")
    a = p.parse_args(argv)
    try:
        model, tok = load_model_and_tokenizer(a.ckpt, a.tokenizer, device=a.device)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    if tok is None:
        sys.exit(f"error: no tokenizer found for {a.ckpt} (none recorded in its meta.json, none beside it): "
                 f"pass --tokenizer DIR")
    ckpt = a.ckpt
    base = [{"role": "system", "content": a.system}] if a.system else []
    if a.prompt:
        reply(model, tok, base + [{"role": "user", "content": a.prompt}], a)
        return
    print(f"{ckpt} ({model.num_params() / 1e6:.1f}M params). Empty line or Ctrl-D to quit.")
    msgs = list(base)
    while True:
        try:
            q = input("you> ").strip()
        except EOFError:
            break
        if not q:
            break
        msgs = (msgs if a.history else list(base)) + [{"role": "user", "content": q}]
        print("bot> ", end="", flush=True)
        with torch.no_grad():
            text = reply(model, tok, msgs, a)
        msgs.append({"role": "assistant", "content": text})


if __name__ == "__main__":
    main()
