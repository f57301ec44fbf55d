"""Benchmark harness shared by bench/bench_<op>.py (run with `pytest bench/`).

`measure(benchmark, fn, ...)` times fn with pytest-benchmark (warm-up, then the median of many
rounds; CUDA synchronized), and records ms and GB/s or TFLOP/s next to this machine's measured
ceiling (copy bandwidth; matmul rate). A table of every row is printed at the end of the run and
written to bench/.results/<machine>.csv, the raw material for bench/RESULTS.md.
"""
import csv
import datetime
import os
import platform
import subprocess
from pathlib import Path

import pytest
import torch

ROWS = []
_CEILINGS = {}
HERE = Path(__file__).resolve().parent


def _steady_state_malloc():
    """Keep freed memory in glibc's heap (no mmap for large blocks, no trim), as a long training
    process settles into: every provider then reuses warm pages round after round. Without it each
    large output is a fresh mmap whose 4 KB first-touch faults (host-side ones too on this VM) cost
    more than most kernels and vary several-fold from run to run. LLMCORE_BENCH_FRESH_MEMORY=1
    measures the fresh-allocation behaviour instead."""
    if os.environ.get("LLMCORE_BENCH_FRESH_MEMORY") == "1" or platform.system() != "Linux":
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: 1 GiB
        libc.mallopt(-1, (1 << 31) - 1)  # M_TRIM_THRESHOLD: never trim
    except (OSError, AttributeError):
        pass


_steady_state_malloc()


def cuda_ok():
    if not torch.cuda.is_available():
        return False
    import llmcore

    return bool(llmcore.build_info()["cuda_bindings"])


BENCH_DEVICES = ["cuda"] if cuda_ok() else ["cpu"]


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def machine_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    return f"{model} x{torch.get_num_threads()} threads"


def copy_bandwidth(device):
    """Measured device copy rate in GB/s, counting bytes read + written (the memory ceiling)."""
    if ("copy", device) not in _CEILINGS:
        n = (1 << 28) if device == "cuda" else (1 << 26)  # 1 GiB / 256 MiB of fp32
        src = torch.randn(n // 4, device=device)
        dst = torch.empty_like(src)
        t = _time(lambda: dst.copy_(src), device, rounds=10)
        _CEILINGS[("copy", device)] = 2 * src.numel() * 4 / t / 1e9
    return _CEILINGS[("copy", device)]


def matmul_tflops(device, dtype=torch.bfloat16):
    """Measured dense matmul rate in TFLOP/s (the compute ceiling)."""
    if ("mm", device, dtype) not in _CEILINGS:
        n = 8192 if device == "cuda" else 1024
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        t = _time(lambda: a @ b, device, rounds=10)
        _CEILINGS[("mm", device, dtype)] = 2 * n**3 / t / 1e12
    return _CEILINGS[("mm", device, dtype)]


def _time(fn, device, rounds=20):
    import statistics
    import time

    for _ in range(3):
        fn()
    _sync(device)
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def measure(benchmark, fn, *, op, provider, mode, shape, dtype, device, nbytes=None, flops=None, rounds=None):
    """Time fn() and record a row. nbytes: the minimum bytes the op must move (read + write);
    flops: its floating-point operations. Returns the median time in seconds."""
    def run():
        fn()
        _sync(device)

    for _ in range(2):
        run()
    benchmark.group = f"{op} {mode} {shape} {str(dtype).replace('torch.', '')}"
    benchmark.pedantic(run, rounds=rounds or (50 if device == "cuda" else 10), iterations=1, warmup_rounds=1)
    med = benchmark.stats.stats.median
    row = dict(op=op, provider=provider, mode=mode, shape=str(shape), dtype=str(dtype).replace("torch.", ""),
               device=device, ms=med * 1e3, rate="", ceiling="")
    if nbytes:
        gbs = nbytes / med / 1e9
        lim = copy_bandwidth(device)
        row.update(rate=f"{gbs:.1f} GB/s", ceiling=f"{100 * gbs / lim:.0f}% of {lim:.0f} GB/s copy")
        benchmark.extra_info["GB/s"] = round(gbs, 2)
    if flops:
        # the ceiling in the row's own dtype: fp32 rows against the fp32 matmul rate (on CPU half
        # the bf16 one), 16-bit rows against that dtype's
        mm_dtype = dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16
        tf = flops / med / 1e12
        lim = matmul_tflops(device, mm_dtype)
        name = str(mm_dtype).replace("torch.", "").replace("float", "fp").replace("bfp", "bf")
        row.update(rate=f"{tf:.2f} TFLOP/s", ceiling=f"{100 * tf / lim:.0f}% of {lim:.2f} TFLOP/s {name} mm")
        benchmark.extra_info["TFLOP/s"] = round(tf, 3)
    ROWS.append(row)
    return med


def pytest_terminal_summary(terminalreporter):
    if not ROWS:
        return
    dev = ROWS[0]["device"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    head = f"{machine_name(dev)} | {datetime.date.today()} | commit {commit} | torch {torch.__version__}"
    tr = terminalreporter
    tr.write_sep("=", "llmcore benchmarks")
    tr.write_line(head)
    # ratio of each provider to llmcore within the same (op, mode, shape, dtype)
    base = {(r["op"], r["mode"], r["shape"], r["dtype"]): r["ms"] for r in ROWS if r["provider"] == "llmcore"}
    fmt = "| {:<12} | {:<18} | {:<8} | {:<22} | {:<8} | {:>9} | {:>14} | {:<28} | {:>10} |"
    tr.write_line(fmt.format("op", "provider", "mode", "shape", "dtype", "ms", "rate", "ceiling", "llmcore x"))
    tr.write_line(fmt.format(*["---"] * 9))
    for r in ROWS:
        b = base.get((r["op"], r["mode"], r["shape"], r["dtype"]))
        speed = f"{r['ms'] / b:.2f}x" if b else ""
        tr.write_line(fmt.format(r["op"], r["provider"], r["mode"], r["shape"], r["dtype"], f"{r['ms']:.3f}",
                                 r["rate"], r["ceiling"], speed))
    out = Path(os.environ.get("LLMCORE_BENCH_DIR", HERE / ".results"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{dev}-{datetime.date.today()}.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["machine", "commit", *ROWS[0].keys()])
        if new:
            w.writeheader()
        for r in ROWS:
            w.writerow({"machine": machine_name(dev), "commit": commit, **r})
    tr.write_line(f"rows appended to {path}")


@pytest.fixture(params=BENCH_DEVICES)
def device(request):
    return request.param
