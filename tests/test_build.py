"""The build: extension loads, build_info is sane, and no CUDA kernel spills registers.

The ptxas resource reports are written by csrc/cmake/nvcc_ptxas_log.sh into build/ptxas/ when nvcc
was found at build time; these checks skip where nvcc is absent.
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
