"""Shared test helpers: devices, dtypes, the one tolerance rule, random inputs.

The tolerance rule (shared/DESIGN.md, after flash-attention):
- float32 / float64: tight absolute + relative tolerance against the fp32/fp64 reference.
- float16 / bfloat16: the kernel's max error against an fp32 reference may be at most `factor`
  (default 2) times the max error of PyTorch computing the same function in that low precision,
  plus a floor of a few ulps of the output scale (so an exactly-rounded baseline with zero error
  does not demand bit-exactness). The baseline's error counts for at most BASELINE_CAP_ULPS ulps
  of the output scale: a baseline that is itself far off (a wrong or mismatched computation, a
  catastrophic low-precision formula) cannot buy the kernel an unbounded tolerance. Measured over
  tests/ops on CPU, PyTorch's 16-bit baselines stay within 3 ulps of the output scale and the
  kernels within 1. NaN/inf must appear exactly where the reference has them.
- The references themselves are checked in fp64 against independent implementations
  (F.rms_norm, math SDPA with an explicit mask, F.silu(g) * u, transformers' rotary, ...) in each
  op's test file (test_reference_*), so a kernel and its oracle cannot share a bug.
"""
import pytest
import torch

import llmcore  # noqa: F401


def _cuda_ok() -> bool:
    if not torch.cuda.is_available():
        return False
    import llmcore.ops  # noqa: F401

    return bool(llmcore.build_info()["cuda_bindings"])


CUDA_OK = _cuda_ok()

# Parametrize over these: CUDA cases carry the `cuda` mark and skip cleanly without a GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU and llmcore CUDA bindings")])]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ODD_SIZES = [1, 7, 127, 1025]


def make(shape, dtype, device, seed=None, scale=1.0, requires_grad=False):
    """Fresh random normal input (never zeros)."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    t = (torch.randn(shape, generator=g, dtype=torch.float32) * scale).to(dtype).to(device)
    return t.requires_grad_(requires_grad)


BASELINE_CAP_ULPS = 4


def _scale(ref):
    return max(1.0, ref.abs().max().item()) if ref.numel() else 1.0


def _floor(dtype, ref):
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    return 4 * torch.finfo(dtype).eps * scale


def assert_close(actual, reference, baseline=None, *, factor=2.0, atol=None, rtol=None, name="output"):
    """Compare `actual` (any dtype) with `reference` (fp32/fp64, computed from the same inputs).

    For 16-bit `actual`, `baseline` is PyTorch's own computation in that dtype; the rule is
    max|actual - reference| <= factor * max|baseline - reference| + floor.
    """
    assert actual.shape == reference.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    a, r = actual.detach().double().cpu(), reference.detach().double().cpu()
    fin = torch.isfinite(r)
    assert torch.equal(torch.isnan(a), torch.isnan(r)), f"{name}: NaN pattern differs from the reference"
    assert torch.equal(a[~fin & ~torch.isnan(r)], r[~fin & ~torch.isnan(r)]), f"{name}: inf pattern differs"
    a, r = a[fin], r[fin]
    if actual.dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(a, r, atol=atol if atol is not None else (1e-5 if actual.dtype == torch.float32 else 1e-10),
                                   rtol=rtol if rtol is not None else (1e-5 if actual.dtype == torch.float32 else 1e-9),
                                   msg=lambda m: f"{name}: {m}")
        return
    err = (a - r).abs().max().item() if a.numel() else 0.0
    if baseline is None:
        tol = (atol if atol is not None else 0.0) + (rtol if rtol is not None else 2 * torch.finfo(actual.dtype).eps) * max(1.0, r.abs().max().item() if r.numel() else 1.0)
        assert err <= tol, f"{name}: max error {err:.3g} > {tol:.3g} ({actual.dtype})"
        return
    b = baseline.detach().double().cpu()[fin]
    base_err = (b - r).abs().max().item() if b.numel() else 0.0
    cap = BASELINE_CAP_ULPS * torch.finfo(actual.dtype).eps * _scale(r)
    tol = factor * min(base_err, cap) + _floor(actual.dtype, r) + (atol or 0.0)
    assert err <= tol, (f"{name}: max error {err:.3g} > {factor} x PyTorch {actual.dtype} error "
                        f"{base_err:.3g}{' (capped at %.3g)' % cap if base_err > cap else ''} + floor ({tol:.3g})")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped otherwise)")
