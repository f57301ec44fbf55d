"""CUDA_DISABLED (llmcore/ops/_lib.py): an op listed there runs its `<op>_reference` on CUDA
tensors, with one RuntimeWarning, and never touches its kernel; CPU calls are unchanged.

No GPU here: the tests make the real `_lib.use_reference` see a CUDA tensor (each op module's
`use_reference` is wrapped to pass it a stand-in with is_cuda=True) and replace the op module's
kernel namespace by one that fails on any use.
"""
import sys
import warnings

import pytest
import torch

import llmcore.ops as lo
from llmcore.ops import _lib
from tests.conftest import make


class _NoKernel:
    def __getattr__(self, name):
        raise AssertionError(f"kernel torch.ops.llmcore.{name} was called for a routed-off op")


def _mod(name):
    return sys.modules[f"llmcore.ops.{name}"]  # llmcore.ops.<name> is the function, not the module


def _cases():
    x, r, w = make((3, 33), torch.bfloat16, "cpu", 0), make((3, 33), torch.bfloat16, "cpu", 1), make((33,), torch.bfloat16, "cpu", 2)
    g, u = make((5, 17), torch.bfloat16, "cpu", 3), make((5, 17), torch.bfloat16, "cpu", 4)
    q, k = make((1, 6, 2, 16), torch.float32, "cpu", 5), make((1, 6, 1, 16), torch.float32, "cpu", 6)
    cos, sin = lo.rope_cache(8, 16)
    qw = 1 + make((16,), torch.float32, "cpu", 7)
    return {
        "rms_norm": ("rms_norm", lambda: lo.rms_norm(x, w), lambda: lo.rms_norm_reference(x, w)),
        "add_rms_norm": ("rms_norm", lambda: lo.add_rms_norm(x, r, w)[0], lambda: lo.add_rms_norm_reference(x, r, w)[0]),
        "swiglu": ("swiglu", lambda: lo.swiglu(g, u), lambda: lo.swiglu_reference(g, u)),
        "rope": ("rope", lambda: lo.rope(q, k, cos, sin)[0], lambda: lo.rope_reference(q, k, cos, sin)[0]),
        "qk_norm_rope": ("qk_norm_rope", lambda: lo.qk_norm_rope(q, k, qw, qw, cos, sin)[0],
                         lambda: lo.qk_norm_rope_reference(q, k, qw, qw, cos, sin)[0]),
        "flash_attn": ("flash_attn", lambda: lo.flash_attn(q, k, k), lambda: lo.flash_attn_reference(q, k, k)),
    }


@pytest.fixture
def fake_cuda(monkeypatch):
    """Tensors count as CUDA for the routing check (only there: kernels still see CPU tensors)."""
    real = _lib.use_reference

    class _Cuda:
        is_cuda = True

    monkeypatch.setattr(_lib, "_warned", set())
    monkeypatch.setattr(_lib, "CUDA_DISABLED", {})
    for mod in ("rms_norm", "swiglu", "rope", "qk_norm_rope", "flash_attn", "moe", "nf4"):
        monkeypatch.setattr(_mod(mod), "use_reference", lambda op, x: real(op, _Cuda()))
    return _lib.CUDA_DISABLED


def test_table_is_empty_by_default():
    assert _lib.CUDA_DISABLED == {}, f"kernels routed off on CUDA: {_lib.CUDA_DISABLED}"


@pytest.mark.parametrize("name", list(_cases()))
def test_routed_off_op_runs_reference_and_warns_once(fake_cuda, monkeypatch, name):
    mod, call, ref = _cases()[name]
    fake_cuda[name] = "failed test_x on H200 (test)"
    monkeypatch.setattr(_mod(mod), "ops", _NoKernel())
    with pytest.warns(RuntimeWarning, match=rf"{name} is routed off its CUDA kernel .*failed test_x on H200"):
        out = call()
    assert torch.equal(out, ref()), "the routed-off op must return exactly its reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(call(), out)  # the warning comes once per op


def test_other_ops_keep_their_kernel(fake_cuda, monkeypatch):
    fake_cuda["swiglu"] = "x"
    monkeypatch.setattr(_mod("rms_norm"), "ops", _NoKernel())
    with pytest.raises(AssertionError, match="kernel torch.ops.llmcore.rms_norm_fwd was called"):
        _cases()["rms_norm"][1]()


@pytest.mark.parametrize("name", list(_cases()))
def test_cpu_behaviour_unchanged(monkeypatch, name):
    """Listing an op changes nothing for CPU tensors: same kernel, same bits, no warning."""
    mod, call, _ = _cases()[name]
    before = call()
    monkeypatch.setattr(_lib, "CUDA_DISABLED", {name: "x"})
    monkeypatch.setattr(_lib, "_warned", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(call(), before)
    monkeypatch.setattr(_mod(mod), "ops", _NoKernel())
    with pytest.raises(AssertionError, match="was called"):
        call()


def test_every_public_op_has_the_reference_it_would_route_to():
    names = ["flash_attn", "flash_attn_varlen", "flash_attn_with_kvcache", "moe_route", "moe_dispatch", "moe_combine",
             "nf4_quantize", "nf4_dequantize", "rms_norm", "add_rms_norm", "rope", "rope_", "qk_norm_rope", "qk_norm_rope_", "swiglu",
             "swiglu_packed"]
    for n in names:
        assert callable(getattr(lo, n)) and callable(getattr(lo, n.rstrip("_") + "_reference")), n
