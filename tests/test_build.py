"""The build: extension loads, build_info is sane, and every CUDA kernel can launch at its block size.

The ptxas resource reports are written by csrc/cmake/nvcc_ptxas_log.sh into build/ptxas/ when nvcc
was found at build time, with the launch bounds (`.maxntid` from the PTX) of every kernel; these
checks skip where nvcc is absent. So a CPU-only CI catches, without a GPU:
- a kernel that spills registers or uses a stack frame;
- a kernel without `__launch_bounds__`: its largest block size is then whatever a launcher
  computes at run time, which nothing here can see (rms_norm launched up to 1024 threads of a
  128-register kernel: "too many resources requested" on every row wider than 16K bf16 / 8K fp32);
- registers x max threads per block above the 64K-register file of an SM (sm_80 / sm_90).
`__launch_bounds__(N)` makes N the most threads a block of that kernel may have: ptxas then keeps
the registers within the budget for N threads (or spills, caught above), and a launch with more
than N threads fails loudly instead of silently running a different configuration. Each launcher
derives its block size from the same constant it passes to `__launch_bounds__`.
"""
import re
import shutil
from pathlib import Path

import pytest

import llmcore

ROOT = Path(__file__).resolve().parents[1]
PTXAS = ROOT / "build" / "ptxas"
NVCC = shutil.which("nvcc") or (Path("/usr/local/cuda/bin/nvcc") if Path("/usr/local/cuda/bin/nvcc").exists() else None)


def test_build_info():
    info = llmcore.build_info()
    assert info["version"] == llmcore.__version__
    assert isinstance(info["cuda_bindings"], bool)
    assert info["cpu_isa_variants"]


@pytest.mark.skipif(NVCC is None, reason="nvcc not found: CUDA kernels were not compiled")
def test_every_cuda_kernel_compiled_for_each_arch():
    sources = sorted((ROOT / "csrc" / "ops").glob("*/*_cuda.cu"))
    assert sources, "no CUDA kernel sources found"
    archs = llmcore.build_info()["cuda_archs"].split(",")
    assert archs and archs[0], "build_info says no CUDA arch was compiled although nvcc is present"
    for src in sources:
        log = PTXAS / f"{src.name}.o.log"
        assert log.exists(), f"no ptxas report for {src.name} in {PTXAS} (rebuild: pip install -e . --no-build-isolation)"
        text = log.read_text()
        for arch in archs:
            assert f"sm_{arch}" in text, f"{src.name} was not compiled for sm_{arch}"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found: CUDA kernels were not compiled")
def test_no_cuda_kernel_spills_or_uses_stack():
    logs = sorted(PTXAS.glob("*.log"))
    assert logs, f"no ptxas reports in {PTXAS}"
    bad = []
    for log in logs:
        func = None
        for line in log.read_text().splitlines():
            m = re.search(r"Function properties for (\S+)", line)
            if m:
                func = m.group(1)
                continue
            m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if m and func and any(int(v) for v in m.groups()):
                bad.append(f"{log.name}: {func}: {line.strip()}")
    assert not bad, "kernels with register spills or a stack frame:\n" + "\n".join(bad)


REGISTER_FILE = 65536   # 32-bit registers per SM, and per block, on sm_80 and sm_90
MAX_THREADS = 1024      # threads per block on every arch we build


def _kernel_resources(text):
    """{(arch, mangled kernel name): (registers, max threads per block or None)} from one log."""
    regs, bounds, entry = {}, {}, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for 'sm_(\w+)'", line)
        if m:
            entry = (m.group(2), m.group(1))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and entry:
            regs[entry] = int(m.group(1))
            entry = None
            continue
        m = re.match(r"llmcore launch bounds: sm_(\w+) (\S+) maxntid (\S+)", line)
        if m:
            dims = None if m.group(3) == "none" else [int(v) for v in m.group(3).split(",") if v]
            bounds[(m.group(1), m.group(2))] = None if dims is None else dims[0] * (dims[1] if len(dims) > 1 else 1) * (dims[2] if len(dims) > 2 else 1)
    return {key: (r, bounds.get(key, "missing")) for key, r in regs.items()}


def registers_per_block(registers, threads):
    """Registers a block of `threads` threads takes: allocated per warp in units of 256
    (8 per thread), warps rounded up."""
    return ((registers + 7) // 8 * 8) * ((threads + 31) // 32 * 32)


def test_register_budget_rule():
    # the arithmetic itself: 64 registers x 1024 threads is exactly the file; 121 rounds up to 128
    assert registers_per_block(64, 1024) == REGISTER_FILE
    assert registers_per_block(121, 512) == REGISTER_FILE and registers_per_block(121, 513) > REGISTER_FILE
    res = _kernel_resources("ptxas info    : Compiling entry function '_Zk' for 'sm_80'\n"
                            "ptxas info    : Used 40 registers, used 1 barriers\n"
                            "llmcore launch bounds: sm_80 _Zk maxntid 256,1,1\n")
    assert res == {("80", "_Zk"): (40, 256)}


@pytest.mark.skipif(NVCC is None, reason="nvcc not found: CUDA kernels were not compiled")
def test_every_cuda_kernel_fits_its_largest_block():
    """Every kernel declares __launch_bounds__, and registers x that block size fit an SM."""
    logs = sorted(PTXAS.glob("*_cuda.cu.o.log"))
    assert logs, f"no ptxas reports in {PTXAS}"
    bad, seen = [], 0
    for log in logs:
        text = log.read_text()
        assert "llmcore launch bounds:" in text, (f"{log.name} has no launch-bounds lines: it was written by an older "
                                                 "csrc/cmake/nvcc_ptxas_log.sh (rebuild from scratch: rm -rf build)")
        for (arch, name), (regs, threads) in sorted(_kernel_resources(text).items()):
            seen += 1
            if threads == "missing":
                bad.append(f"{log.name}: {name} (sm_{arch}): no launch-bounds line for this kernel in the report")
            elif threads is None:
                need = registers_per_block(regs, MAX_THREADS)
                bad.append(f"{log.name}: {name} (sm_{arch}): no __launch_bounds__, so any block up to {MAX_THREADS} "
                           f"threads may be launched ({regs} registers x {MAX_THREADS} = {need}"
                           f"{' > ' + str(REGISTER_FILE) if need > REGISTER_FILE else ''})")
            elif registers_per_block(regs, threads) > REGISTER_FILE:
                bad.append(f"{log.name}: {name} (sm_{arch}): {regs} registers x {threads} threads = "
                           f"{registers_per_block(regs, threads)} > {REGISTER_FILE}")
    assert seen, "no kernels found in the ptxas reports"
    assert not bad, "kernels that cannot launch at their largest block size:\n" + "\n".join(bad)
