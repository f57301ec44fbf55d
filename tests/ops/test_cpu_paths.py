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
# (4096, 2301): rows that start off the 16-lane boundary, more than one row per thread chunk;
# float32 takes the generic path in both runs (a control: the two runs must then agree exactly)
for dt in [torch.bfloat16, torch.float32]:
  for M, N in [(3, 37), (64, 1408), (1, 5), (4096, 2301)]:
    g = (torch.randn(M, N) * 6).to(dt)
    u = torch.randn(M, N).to(dt)
    g.view(-1)[:4] = torch.tensor([float("inf"), -float("inf"), float("nan"), -100.0]).to(dt)
    dy = torch.randn(M, N).to(dt)
    gu = torch.cat([g, u], -1)
    key = f"{dt}_{M}x{N}"
    out[f"y_{key}"] = torch.ops.llmcore.swiglu_fwd(g, u)
    out[f"dg_{key}"], out[f"du_{key}"] = torch.ops.llmcore.swiglu_bwd(dy, g, u)
    out[f"yp_{key}"] = torch.ops.llmcore.swiglu_packed_fwd(gu)
    out[f"dgu_{key}"] = torch.ops.llmcore.swiglu_packed_bwd(dy, gu)
    out[f"y1_{key}"] = torch.ops.llmcore.swiglu_fwd(g[:, 1:], u[:, 1:])  # strided, odd offset
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
        # one rounding apart at most (the two paths order the divide differently)
        # (fp32: dg = d*u*sig*(1 + g*(1 - sig)) cancels near g = -1.28, hence an absolute floor)
        bf16 = fast[k].dtype == torch.bfloat16
        torch.testing.assert_close(fast[k].float(), generic[k].float(), rtol=2 ** -7 if bf16 else 1e-5,
                                   atol=1e-30 if bf16 else 1e-6, equal_nan=True,
                                   msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_outputs_threads_and_huge_pages(dtype, threads):
    """Outputs >= 8 MB go through empty_output (common/alloc.h: huge-page advice when the memory is
    fresh) and every op splits its work over the OpenMP pool: results must match the references,
    bitwise equal across thread counts."""
    import llmcore.ops as lo
    from tests.conftest import assert_close

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(1024, 2304, generator=g).to(dtype)  # 9 MB in fp32
        w = torch.randn(2304, generator=g).to(dtype)
        u = torch.randn(1024, 2304, generator=g).to(dtype)
        assert_close(lo.rms_norm(x, w), lo.rms_norm_reference(x, w), name="rms_norm")
        assert_close(lo.swiglu(x, u), lo.swiglu_reference(x, u), name="swiglu")
        q = torch.randn(4, 512, 16, 64, generator=g).to(dtype)  # 8 MB in fp32
        k = torch.randn(4, 512, 4, 64, generator=g).to(dtype)
        cos, sin = lo.rope_cache(512, 64)
        for a, b in zip(lo.rope(q, k, cos, sin), lo.rope_reference(q, k, cos, sin)):
            assert_close(a, b, name="rope")
        outs = [lo.rms_norm(x, w), lo.swiglu(x, u), *lo.rope(q, k, cos, sin)]
    finally:
        torch.set_num_threads(old)
    torch.set_num_threads(1 if threads == 2 else 2)
    try:
        again = [lo.rms_norm(x, w), lo.swiglu(x, u), *lo.rope(q, k, cos, sin)]
    finally:
        torch.set_num_threads(old)
    for a, b in zip(outs, again):
        assert torch.equal(a, b)
