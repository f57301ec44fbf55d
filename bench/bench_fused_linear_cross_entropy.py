"""fused_linear_cross_entropy: time and peak memory of loss + backward (dhidden, dweight) against
PyTorch: `F.cross_entropy(F.linear(h, W).float(), t)` eager (logits upcast as HF / Liger's baseline
do) and torch.compile of it, and Liger's LigerFusedLinearCrossEntropyLoss where installed (CUDA).

Shapes (N tokens, H, V): 4096 x 896 x 151936 (Qwen2.5-0.5B) and 8192 x 512 x 6400 (minimind), bf16
(and fp32 for minimind). Time: the providers alternate call by call in one process (this VM's
absolute times drift between runs), median of the rounds. Peak memory: one fresh process per
provider and shape, the growth of the peak RSS (CPU: VmHWM after a reset, glibc told to mmap every
block of 64 KB or more so that freed memory leaves the RSS) or of
torch.cuda.max_memory_allocated over one loss + backward after a warm-up, inputs excluded.

    PYTHONPATH=$PWD python bench/bench_fused_linear_cross_entropy.py [--rounds 7] [--device cpu]
        [--shapes qwen,minimind] [--providers llmcore,torch,torch.compile]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = {"qwen": (4096, 896, 151936), "minimind": (8192, 512, 6400)}


def _inputs(shape, dtype, device):
    import torch

    N, H, V = shape
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, H, generator=g).to(dtype).to(device).requires_grad_()
    w = (torch.randn(V, H, generator=g) * H ** -0.5).to(dtype).to(device).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g).to(device)
    t[::7] = -100  # some ignored positions, as in any batch with padding / prompts
    return h, w, t


def _provider(name):
    import torch
    import torch.nn.functional as F

    import llmcore.ops as lo

    def torch_ce(h, w, t):
        return F.cross_entropy(F.linear(h, w).float(), t, ignore_index=-100)

    if name == "llmcore":
        return lambda h, w, t: lo.fused_linear_cross_entropy(h, w, t)
    if name == "torch":
        return torch_ce
    if name == "torch.compile":
        return torch.compile(torch_ce, dynamic=False)
    if name == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
        return lambda h, w, t: loss(w, h, t)
    raise ValueError(name)


def _step(fn, h, w, t):
    import torch

    loss = fn(h, w, t)
    torch.autograd.grad(loss, (h, w))


def _sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024


def memory_process(provider, shape, dtype_name, device):
    """Peak growth (bytes) of one loss + backward, in this fresh process."""
    import torch

    dtype = getattr(torch, dtype_name)
    h, w, t = _inputs(shape, dtype, device)
    fn = _provider(provider)
    _step(fn, h, w, t)  # warm-up (compilation, oneDNN primitive caches)
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _step(fn, h, w, t)
        _sync(device)
        return torch.cuda.max_memory_allocated() - base
    base = _status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")
    _step(fn, h, w, t)
    return _status("VmHWM") - base


def time_process(providers, shape, dtype_name, device, rounds):
    """Median seconds per loss + backward, providers alternating call by call."""
    import torch

    dtype = getattr(torch, dtype_name)
    h, w, t = _inputs(shape, dtype, device)
    fns = {p: _provider(p) for p in providers}
    for f in fns.values():
        _step(f, h, w, t)
    times = {p: [] for p in providers}
    for _ in range(rounds):
        for p, f in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            _step(f, h, w, t)
            _sync(device)
            times[p].append(time.perf_counter() - t0)
    return {p: statistics.median(v) for p, v in times.items()}


def _child(args):
    env = dict(os.environ)
    if args["kind"] == "mem":  # every block >= 64 KB its own mmap, unmapped when freed: RSS follows the live bytes
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", MALLOC_TOP_PAD_="0")
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True,
                         env=env)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", default="minimind,qwen")
    ap.add_argument("--providers", default="llmcore,torch,torch.compile")
    a = ap.parse_args()
    if a.child:
        c = json.loads(a.child)
        if c["kind"] == "mem":
            print(json.dumps({"peak": memory_process(c["provider"], tuple(c["shape"]), c["dtype"], c["device"])}))
        else:
            print(json.dumps(time_process(c["providers"], tuple(c["shape"]), c["dtype"], c["device"], c["rounds"])))
        return
    providers = a.providers.split(",")
    if a.device == "cuda":
        try:
            import liger_kernel  # noqa: F401

            providers.append("liger")
        except ImportError:
            pass
    cases = []
    for s in a.shapes.split(","):
        cases.append((s, "bfloat16"))
        if s == "minimind":
            cases.append((s, "float32"))
    print("| shape (N x H x V) | dtype | provider | median ms | vs torch eager | peak MiB | vs torch eager |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for s, dt in cases:
        shape = SHAPES[s]
        tm = _child({"kind": "time", "providers": providers, "shape": shape, "dtype": dt, "device": a.device,
                     "rounds": a.rounds})
        mem = {p: _child({"kind": "mem", "provider": p, "shape": shape, "dtype": dt, "device": a.device})
               for p in providers}
        for p in providers:
            ms = tm.get(p, float("nan")) * 1e3 if "error" not in tm else float("nan")
            pk = mem[p].get("peak", float("nan")) / 2 ** 20
            t_ref = tm.get("torch", float("nan")) * 1e3 if "error" not in tm else float("nan")
            m_ref = mem["torch"].get("peak", float("nan")) / 2 ** 20 if "torch" in mem else float("nan")
            print(f"| {s} {' x '.join(map(str, shape))} | {dt} | {p} | {ms:.1f} | {t_ref / ms:.2f}x | {pk:.0f} | "
                  f"{pk / m_ref:.3f} |", flush=True)
        if "error" in tm:
            print(f"  time run failed: {tm['error']}")


if __name__ == "__main__":
    main()
