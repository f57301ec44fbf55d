"""CUDA cases at the sizes that stress launch limits and 32-bit index math (issue 15): an
elementwise op past 2**31 elements, varlen attention over thousands of sequences, rms_norm over
more rows than a 16-bit grid dimension. (Rows of 16-32K elements for rms_norm are in
test_rms_norm.py's test_rms_norm_wide_rows.) CUDA only: the CPU kernels have no grid limits and
these sizes would take minutes there; they skip without a GPU (scripts/gpu_check.sh runs them)."""
import pytest
import torch
import torch.nn.functional as F

import llmcore.ops as lo
from tests.conftest import CUDA_OK, assert_close, make

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU and llmcore CUDA bindings")]


def _free_gib():
    free, _ = torch.cuda.mem_get_info()
    return free / 2**30


def test_swiglu_past_2_pow_31_elements():
    """bf16 gate/up of 65540 x 32768 = 2**31 + 131072 elements (3 x 4 GiB): a kernel indexing in
    int32 wraps past 2**31 and writes the wrong rows (or faults). Rows checked: first, around the
    2**31 boundary, last (all of the output has been written by then)."""
    if _free_gib() < 16:
        pytest.skip("needs 16 GiB of free GPU memory")
    M, N = 65540, 32768
    assert M * N > 2**31
    g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    u = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y = lo.swiglu(g, u)
    edge = 2**31 // N  # the row that holds element 2**31
    rows = torch.tensor([0, 1, edge - 1, edge, edge + 1, M - 2, M - 1], device="cuda")
    gs, us = g[rows], u[rows]
    assert_close(y[rows], lo.swiglu_reference(gs.float(), us.float()), F.silu(gs) * us, name="swiglu rows past 2**31")
    del g, u, y
    gu = torch.randn(M // 2, 2 * N, device="cuda", dtype=torch.bfloat16)  # packed: 2**31 + 131072 inputs
    with torch.no_grad():
        yp = lo.swiglu_packed(gu)
    rows = torch.tensor([0, M // 4, M // 2 - 1], device="cuda")
    assert_close(yp[rows], lo.swiglu_packed_reference(gu[rows].float()), name="swiglu_packed past 2**31 inputs")


def test_varlen_many_sequences():
    """2053 packed sequences of 1..48 tokens (one block row per sequence and head in the grid),
    forward and backward against the fp32 reference."""
    g = torch.Generator().manual_seed(7)
    lens = torch.randint(1, 49, (2053,), generator=g)
    lens[::97] = 1  # plenty of single-token sequences
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    cu = cu.cuda()
    total, m = int(cu[-1]), int(lens.max())
    q, k, v = (make((total, h, 64), torch.bfloat16, "cuda", seed=s, requires_grad=True) for s, h in ((1, 4), (2, 2), (3, 2)))
    out, lse = lo.flash_attn_varlen(q, k, v, cu, cu, m, m, causal=True, return_lse=True)
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    out_r, lse_r = lo.flash_attn_varlen_reference(qr, kr, vr, cu, cu, m, m, causal=True, return_lse=True)
    assert_close(out, out_r, name="out", atol=2e-2)
    assert_close(lse, lse_r, name="lse", atol=1e-3, rtol=1e-3)
    dy = make((total, 4, 64), torch.bfloat16, "cuda", seed=4)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dy)
    dqr, dkr, dvr = torch.autograd.grad(out_r, (qr, kr, vr), dy.float())
    for a, r, n in ((dq, dqr, "dq"), (dk, dkr, "dk"), (dv, dvr, "dv")):
        assert_close(a, r, name=n, atol=5e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_rows_past_65535(dtype):
    """131073 rows (past a 16-bit grid.y / 65535-block dimension) of odd width 129, fwd + bwd."""
    x = make((131073, 129), dtype, "cuda", seed=0, requires_grad=True)
    w = make((129,), dtype, "cuda", seed=1, requires_grad=True)
    y = lo.rms_norm(x, w)
    dy = make((131073, 129), dtype, "cuda", seed=2)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    yr = lo.rms_norm_reference(xr, wr)
    dxr, dwr = torch.autograd.grad(yr, (xr, wr), dy.float())
    tol16 = dict(atol=2 * torch.finfo(dtype).eps * 8) if dtype != torch.float32 else {}
    assert_close(y, yr, name="y", **tol16)
    assert_close(dx, dxr, name="dx", atol=1e-4 if dtype == torch.float32 else 3e-2)
    assert_close(dw, dwr, name="dweight", atol=1e-4 * 131073 ** 0.5 if dtype == torch.float32 else 2.0, rtol=1e-2)
