"""White-box knowledge distillation: a student learns from a teacher checkpoint (same tokenizer) on
SFT conversations, loss = alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T), assistant tokens.

    python scripts/distill.py --teacher out/sft --out out/distill                       # fresh small student
    python scripts/distill.py --teacher out/sft --init out/small_sft --out out/distill   # from a checkpoint
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from llmcore.model import build_model, get_config  # noqa: E402
from llmcore.train import stage_cli  # noqa: E402
from llmcore.train.chatdata import ChatDataset  # noqa: E402
from llmcore.train.distill import teacher_kl, train_distill  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    stage_cli.add_common_args(p, init_help="student checkpoint (default: a fresh model, --student-* shape)")
    for a in p._actions:
        if a.dest == "init":
            a.required = False
    p.add_argument("--teacher", required=True)
    p.add_argument("--student-dim", type=int, default=128)
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--alpha", type=float, default=0.2, help="CE weight (1 = CE only)")
    p.add_argument("--temperature", type=float, default=1.0)
    args = p.parse_args(argv)
    tok, data, ev = stage_cli.default_data(args, "sft", None, init=args.init or args.teacher)
    teacher = stage_cli.load_init(args.teacher, args.device)
    if args.init:
        student = stage_cli.load_init(args.init, args.device)
    else:
        torch.manual_seed(args.seed)
        tc = teacher.cfg
        student = build_model(get_config("tiny", dim=args.student_dim, n_layers=args.student_layers,
                                         n_heads=max(1, args.student_dim // 64) * 2, n_kv_heads=max(1, args.student_dim // 64),
                                         vocab_size=tc.vocab_size, max_seq_len=tc.max_seq_len, backend=tc.backend))
    print(f"teacher {teacher.num_params():,} params, student {student.num_params():,} params")
    ds = ChatDataset(data, tok, args.max_len, args.skip_bad)
    held = ChatDataset(args.eval_data, tok, args.max_len, args.skip_bad) if args.eval_data else None
    cfg = stage_cli.train_config(args, 2e-3 if not args.init else 5e-4, tok=tok, stage="distill")
    hist = train_distill(student, teacher, ds, cfg, args.alpha, args.temperature)
    if held is not None:
        print(f"held-out KL(teacher || student): {teacher_kl(student, teacher, held, device=args.device):.4f}")
    print(f"{hist['step']} steps in {hist['seconds']:.1f}s; {stage_cli.memory_report('distill')}")
    return hist


if __name__ == "__main__":
    stage_cli.run_cli(main)
