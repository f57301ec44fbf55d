"""Quick GPU benchmarks for scripts/gpu_check.sh: one chip-filling shape per op against its peers,
and the minimind-26m training step (tokens/s, MFU). CUDA events, L2 flushed before every timed
call (a 256 MiB write), median of the repetitions; each row gives GB/s or TFLOP/s as % of the
ceilings measured by gpu_preflight.py and the peer's time / llmcore's. Rows are appended to --out
as each finishes, so a cut-off run keeps what it measured; a provider that fails is a row saying so.

    python3 scripts/gpu_bench_quick.py --out gpu_out/bench_quick.md --ceilings gpu_out/ceilings.json
"""
import argparse
import json
import statistics

import torch
import torch.nn.functional as F

import llmcore.ops as lo

_flush = None


def time_ms(fn, reps=15):
    global _flush
    if _flush is None:
        _flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    for _ in range(2):
        fn()
    ts = []
    for _ in range(reps):
        _flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


class Table:
    def __init__(self, path, ceil):
        self.path, self.ceil = path, ceil
        with open(path, "w") as f:
            f.write(f"GPU {ceil.get('gpu')}: copy {ceil.get('copy_GBps')} GB/s, bf16 mm {ceil.get('bf16_mm_TFLOPs')} TFLOP/s "
                    "(measured by gpu_preflight.py); CUDA events, L2 flushed, medians\n\n"
                    "| op | shape | provider | ms | rate | % of ceiling | peer ms / llmcore ms |\n|---|---|---|---:|---|---:|---:|\n")

    def group(self, op, shape, providers, nbytes=None, flops=None):
        """providers: name -> zero-argument callable; 'llmcore' first."""
        base = None
        for name, fn in providers.items():
            try:
                ms = time_ms(fn)
            except Exception as e:  # noqa: BLE001 (a failing provider is reported, the rest go on)
                self._row(op, shape, name, "", f"failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}", "", "")
                continue
            if name == "llmcore":
                base = ms
            if nbytes:
                r = nbytes / ms / 1e6
                rate, pct = f"{r:.0f} GB/s", f"{100 * r / self.ceil['copy_GBps']:.0f}%"
            else:
                r = flops / ms / 1e9
                rate, pct = f"{r:.0f} TFLOP/s", f"{100 * r / self.ceil['bf16_mm_TFLOPs']:.0f}%"
            ratio = f"{ms / base:.2f}x" if base and name != "llmcore" else ""
            self._row(op, shape, name, f"{ms:.3f}", rate, pct, ratio)

    def _row(self, *cells):
        line = "| " + " | ".join(str(c) for c in cells) + " |"
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def _try(fn):
    try:
        return fn()
    except Exception:  # noqa: BLE001 (an optional peer)
        return None


def bench_flash_attn(t):
    B, S, H, D = 4, 4096, 16, 128
    q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dy = torch.randn_like(q)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backend):
        def fn():
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                      is_causal=True).transpose(1, 2)
        return fn
    impl = {"llmcore": lambda: lo.flash_attn(q, k, v, True), "sdpa-flash": sdpa(SDPBackend.FLASH_ATTENTION),
            "sdpa-cudnn": sdpa(SDPBackend.CUDNN_ATTENTION)}
    fl = 4 * B * H * S * S * D / 2  # causal
    with torch.no_grad():
        t.group("flash_attn fwd causal", (B, S, H, D), {n: f for n, f in impl.items()}, flops=fl)
    t.group("flash_attn fwd+bwd causal", (B, S, H, D),
            {n: (lambda f=f: torch.autograd.grad(f(), (q, k, v), dy)) for n, f in impl.items()}, flops=3.5 * fl)


def bench_rms_norm(t):
    M, N = 32768, 4096
    x, w = torch.randn(M, N, device="cuda", dtype=torch.bfloat16), torch.randn(N, device="cuda", dtype=torch.bfloat16)
    ps = {"llmcore": lambda: lo.rms_norm(x, w)}
    comp = torch.compile(lambda a, b: F.rms_norm(a, (N,), b, 1e-6))
    ps["torch.compile"] = lambda: comp(x, w)
    liger = _try(lambda: __import__("liger_kernel.ops.rms_norm", fromlist=["x"]).LigerRMSNormFunction)
    if liger:
        ps["liger"] = lambda: liger.apply(x, w, 1e-6, 0.0, "llama", False)
    with torch.no_grad():
        t.group("rms_norm fwd", (M, N), ps, nbytes=2 * M * N * 2)


def bench_swiglu(t):
    M, N = 16384, 11008
    g, u = torch.randn(M, N, device="cuda", dtype=torch.bfloat16), torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    comp = torch.compile(lo.swiglu_reference)
    ps = {"llmcore": lambda: lo.swiglu(g, u), "torch.compile": lambda: comp(g, u)}
    liger = _try(lambda: __import__("liger_kernel.ops.swiglu", fromlist=["x"]).LigerSiLUMulFunction)
    if liger:
        ps["liger"] = lambda: liger.apply(g, u)
    with torch.no_grad():
        t.group("swiglu fwd", (M, N), ps, nbytes=3 * M * N * 2)


def bench_rope(t):
    B, S, Hq, Hk, D = 4, 4096, 16, 4, 128
    cos, sin = lo.rope_cache(S, D, device="cuda")
    q, k = torch.randn(B, S, Hq, D, device="cuda", dtype=torch.bfloat16), torch.randn(B, S, Hk, D, device="cuda", dtype=torch.bfloat16)
    comp = torch.compile(lo.rope_reference)
    ps = {"llmcore": lambda: lo.rope(q, k, cos, sin), "torch.compile": lambda: comp(q, k, cos, sin)}
    lig = _try(lambda: __import__("liger_kernel.transformers.rope", fromlist=["x"]).liger_rotary_pos_emb)
    if lig:
        c, s = torch.cat([cos, cos], -1)[None].bfloat16(), torch.cat([sin, sin], -1)[None].bfloat16()
        ps["liger"] = lambda: lig(q.transpose(1, 2), k.transpose(1, 2), c, s)
    with torch.no_grad():
        t.group("rope fwd", (B, S, Hq, Hk, D), ps, nbytes=2 * B * S * (Hq + Hk) * D * 2)


def bench_moe(t):
    T, E, K, H = 16384, 64, 6, 2048
    logits = torch.randn(T, E, device="cuda")
    ids = torch.topk(logits, K, -1).indices.int()
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(T, K, device="cuda")
    with torch.no_grad():
        t.group("moe_dispatch", (T, E, K, H), {"llmcore": lambda: lo.moe_dispatch(x, ids, E),
                                               "reference": lambda: lo.moe_dispatch_reference(x, ids, E)},
                nbytes=(T * H + T * K * H) * 2)
        xp, _, _, rmap = lo.moe_dispatch(x, ids, E)
        t.group("moe_combine", (T, E, K, H), {"llmcore": lambda: lo.moe_combine(xp, w, rmap, T),
                                              "reference": lambda: lo.moe_combine_reference(xp, w, rmap, T)},
                nbytes=(T * H + T * K * H) * 2)


def bench_nf4(t):
    shape = (8192, 8192)
    wt = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    nf = lo.nf4_quantize(wt, 64)
    ps = {"llmcore": lambda: lo.nf4_dequantize(nf)}
    bnbF = _try(lambda: __import__("bitsandbytes.functional", fromlist=["x"]))
    if bnbF:
        packed, qs = bnbF.quantize_4bit(wt, blocksize=64, compress_statistics=True, quant_type="nf4")
        ps["bitsandbytes"] = lambda: bnbF.dequantize_4bit(packed, qs)
    n = wt.numel()
    with torch.no_grad():
        t.group("nf4_dequantize", shape, ps, nbytes=n // 2 + n // 64 + 2 * n)


def bench_train_step(t):
    from bench.bench_train_step import make_step

    preset, batch, seq = "minimind-26m", 32, 512
    for provider in ("llmcore", "torch"):
        try:
            model, step = make_step(preset, batch, seq, "cuda", provider)
            ms = time_ms(step, reps=10)
        except Exception as e:  # noqa: BLE001
            t._row(f"train_step {preset}", (batch, seq), provider, "", f"failed: {type(e).__name__}: {str(e)[:100]}", "", "")
            continue
        tok = batch * seq
        tf = model.flops_per_token(seq) * tok / ms / 1e9
        t._row(f"train_step {preset} (fwd+bwd+AdamW, bf16 autocast)", (batch, seq), provider, f"{ms:.2f}",
               f"{tok / ms * 1e3:,.0f} tokens/s, {tf:.0f} TFLOP/s", f"MFU {100 * tf / t.ceil['bf16_mm_TFLOPs']:.1f}%", "")
        del model, step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_quick.md")
    ap.add_argument("--ceilings", default="ceilings.json")
    a = ap.parse_args()
    try:
        ceil = json.load(open(a.ceilings))
    except OSError:
        ceil = {}
    if "copy_GBps" not in ceil:
        import subprocess
        import sys
        subprocess.run([sys.executable, __file__.replace("gpu_bench_quick", "gpu_preflight"), a.ceilings], check=True)
        ceil = json.load(open(a.ceilings))
    t = Table(a.out, ceil)
    failed = []
    for fn in (bench_flash_attn, bench_rms_norm, bench_swiglu, bench_rope, bench_moe, bench_nf4, bench_train_step):
        try:
            fn(t)
        except Exception as e:  # noqa: BLE001 (setup of one op failed: the others still run)
            failed.append(fn.__name__)
            t._row(fn.__name__, "", "setup failed", "", f"{type(e).__name__}: {str(e).splitlines()[0][:120]}", "", "")
        torch.cuda.empty_cache()
    print(f"DETAIL: {7 - len(failed)}/7 groups measured" + (f"; setup failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
