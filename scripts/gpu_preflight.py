"""GPU preflight for scripts/gpu_check.sh: the GPU is visible, the peers import, and the two
ceilings every figure is compared with, measured here: device copy GB/s (bytes read + written,
1 GiB fp32 copy) and dense bf16 matmul TFLOP/s (8192^3), medians of CUDA-event timings.

    python3 scripts/gpu_preflight.py OUT/ceilings.json
Exits 1 when torch sees no GPU (nothing else can run); missing peers are reported, not fatal.
"""
import json
import statistics
import sys

import torch


def _median_ms(fn, reps=10):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def main(path):
    if not torch.cuda.is_available():
        print(f"DETAIL: torch {torch.__version__} sees no CUDA GPU")
        return 1
    props = torch.cuda.get_device_properties(0)
    info = {"gpu": props.name, "sm": f"{props.major}.{props.minor}", "sms": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1), "torch": torch.__version__, "cuda": torch.version.cuda}
    peers = {}
    for name in ("liger_kernel", "bitsandbytes", "triton"):
        try:
            mod = __import__(name)
            peers[name] = getattr(mod, "__version__", "?")
        except Exception as e:  # noqa: BLE001 (a peer that fails to import, whatever the reason)
            peers[name] = f"MISSING ({type(e).__name__}: {str(e)[:80]})"
    info["peers"] = peers
    src = torch.randn(1 << 28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src))
    info["copy_GBps"] = round(2 * src.numel() * 4 / ms / 1e6, 1)
    del src, dst
    n = 8192
    a, b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = _median_ms(lambda: a @ b)
    info["bf16_mm_TFLOPs"] = round(2 * n**3 / ms / 1e9, 1)
    with open(path, "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info, indent=1))
    missing = [k for k, v in peers.items() if v.startswith("MISSING")]
    print(f"DETAIL: {info['gpu']} sm_{props.major}{props.minor}: copy {info['copy_GBps']} GB/s, bf16 mm "
          f"{info['bf16_mm_TFLOPs']} TFLOP/s; peers missing: {', '.join(missing) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "ceilings.json"))
