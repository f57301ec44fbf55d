"""One training step (forward + backward + AdamW) of a tiny random Qwen2ForCausalLM on CPU, unpatched
(transformers' sdpa, eager modules) vs llmcore.hf.apply_kernels, paired and alternating step by step in
one process (one run's absolute times drift on a shared machine). Peak memory: the largest RSS growth
(ru_maxrss is process-wide, so each provider is also run alone in a fresh process for its peak).

    python bench/bench_hf_kernels.py [--steps 20] [--seq 256] [--batch 4] [--peak llmcore|hf]
"""
import argparse
import copy
import statistics
import sys
import time

import torch
import transformers


def build(seed=0):
    cfg = transformers.Qwen2Config(vocab_size=6400, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
                                   attn_implementation="sdpa")
    torch.manual_seed(seed)
    return transformers.Qwen2ForCausalLM(cfg).train()


def step(model, opt, ids):
    opt.zero_grad(set_to_none=True)
    t = time.perf_counter()
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    opt.step()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--peak", choices=["llmcore", "hf"], default=None)
    a = ap.parse_args()
    import llmcore.hf
    ids = torch.randint(0, 6400, (a.batch, a.seq), generator=torch.Generator().manual_seed(1))
    if a.peak:
        import resource
        m = build()
        if a.peak == "llmcore":
            llmcore.hf.apply_kernels(m)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for _ in range(3):
            step(m, opt, ids)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"{a.peak}: peak RSS growth over 3 steps {(after - before) / 1024:.1f} MiB")
        return
    ref = build()
    pat = llmcore.hf.apply_kernels(copy.deepcopy(ref))
    opts = {id(ref): torch.optim.AdamW(ref.parameters(), lr=1e-4), id(pat): torch.optim.AdamW(pat.parameters(), lr=1e-4)}
    times = {"hf": [], "llmcore": []}
    for i in range(a.steps + 3):
        order = [("hf", ref), ("llmcore", pat)] if i % 2 == 0 else [("llmcore", pat), ("hf", ref)]
        for name, m in order:
            dt = step(m, opts[id(m)], ids)
            if i >= 3:
                times[name].append(dt)
    h, l = statistics.median(times["hf"]), statistics.median(times["llmcore"])
    ratios = sorted(x / y for x, y in zip(times["hf"], times["llmcore"]))  # per adjacent pair: robust to drift
    q = lambda f: ratios[min(len(ratios) - 1, int(f * len(ratios)))]
    print(f"tokens/step {a.batch * a.seq}, threads {torch.get_num_threads()}, steps {a.steps}")
    print(f"transformers (sdpa, eager) median {h * 1e3:.1f} ms; llmcore.hf median {l * 1e3:.1f} ms")
    print(f"paired speedup hf/llmcore: median {statistics.median(ratios):.2f}x (quartiles {q(0.25):.2f}-{q(0.75):.2f})")


if __name__ == "__main__":
    sys.exit(main())
