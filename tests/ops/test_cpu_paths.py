"""The CPU kernels have two paths for bfloat16 on CPUs with AVX512-BF16: the hand-vectorized one
(common/cpu_avx512bf16.h) and the generic one (LLMCORE_CPU_BF16_PATH=0). CI runs whichever its CPU
picks, so this test runs both, in subprocesses, on the same inputs (odd widths for the masked
tails, strided packed halves, inf/NaN, large |x|), and requires them to agree to bf16 rounding."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llmcore

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import sys, torch, llmcore
torch.manual_seed(0)
out = {"path": llmcore.build_info()["cpu_avx512bf16_path"]}
for M, N in [(3, 37), (64, 1408), (1, 5)]:
    g = (torch.randn(M, N) * 6).to(torch.bfloat16)
    u = torch.randn(M, N).to(torch.bfloat16)
    g.view(-1)[:4] = torch.tensor([float("inf"), -float("inf"), float("nan"), -100.0]).to(torch.bfloat16)
    dy = torch.randn(M, N).to(torch.bfloat16)
    gu = torch.cat([g, u], -1)
    out[f"y_{M}x{N}"] = torch.ops.llmcore.swiglu_fwd(g, u)
    out[f"dg_{M}x{N}"], out[f"du_{M}x{N}"] = torch.ops.llmcore.swiglu_bwd(dy, g, u)
    out[f"yp_{M}x{N}"] = torch.ops.llmcore.swiglu_packed_fwd(gu)
    out[f"dgu_{M}x{N}"] = torch.ops.llmcore.swiglu_packed_bwd(dy, gu)
torch.save(out, sys.argv[1])
"""


def _run(flag, path):
    env = dict(os.environ, LLMCORE_CPU_BF16_PATH=flag, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return torch.load(path)


def test_avx512bf16_path_matches_generic_path(tmp_path):
    if not llmcore.build_info()["cpu_avx512bf16_path"]:
        pytest.skip("this CPU has no AVX512-BF16 (or LLMCORE_CPU_BF16_PATH=0): only the generic path runs")
    fast, generic = _run("1", tmp_path / "fast.pt"), _run("0", tmp_path / "generic.pt")
    assert fast.pop("path") is True and generic.pop("path") is False
    assert fast.keys() == generic.keys()
    for k in fast:
        # one bf16 rounding apart at most (the two paths order the divide differently)
        torch.testing.assert_close(fast[k].float(), generic[k].float(), rtol=2 ** -7, atol=1e-30, equal_nan=True,
                                   msg=lambda m: f"{k}: {m}")
