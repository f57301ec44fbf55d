"""Loading the extension and choosing the backend of every op.

The extension (llmcore._C) registers the `torch.ops.llmcore.*` schemas and their CPU/CUDA
implementations. Without it, importing llmcore.ops fails with instructions: there is no silent
fallback. `LLMCORE_BACKEND=reference` (or `set_backend("reference")`) routes every public op
through its pure-PyTorch `<op>_reference` instead — a debugging and comparison aid.

CUDA_DISABLED routes single ops off their CUDA kernel: a kernel that failed on a GPU
(scripts/gpu_check.sh) is listed there until it is fixed, so it is never left enabled.
"""
import os
import warnings

import torch

_BACKENDS = ("llmcore", "reference")
_backend = os.environ.get("LLMCORE_BACKEND", "llmcore")
if _backend not in _BACKENDS:
    raise ValueError(f"LLMCORE_BACKEND must be one of {_BACKENDS}, got {_backend!r}")

# LLMCORE_CPU_GEMM caps the engine of the CPU flash attention's tile GEMMs (csrc/common/cpu_gemm.h):
# the best the CPU has by default (amx > avx512bf16 > the fp32 FMA tiles). The ATen GEMMs our other
# CPU ops call (fused linear cross-entropy's chunks, the MoE experts', NF4's matmul) stay oneDNN's
# choice (AMX where present): capping oneDNN (ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16) was measured to
# drop its bf16 matmul from 1089 to 48 GFLOP/s on one Sapphire Rapids thread, a fallback rather than
# what an AVX512-BF16 CPU runs, so it is not done here. Read once per process.
CPU_GEMM_ENGINES = ("amx", "avx512bf16", "avx512", "avx2")
_cpu_gemm = os.environ.get("LLMCORE_CPU_GEMM", "")
if _cpu_gemm and _cpu_gemm not in CPU_GEMM_ENGINES:
    raise ValueError(f"LLMCORE_CPU_GEMM must be one of {CPU_GEMM_ENGINES}, got {_cpu_gemm!r}")

_ext = None


def load_extension():
    global _ext
    if _ext is None:
        try:
            from llmcore import _C
        except ImportError as e:
            raise ImportError(
                "llmcore's C++ extension (llmcore._C) is not built or failed to load: "
                f"{e}. Build it from the repository root with: pip install torch==2.13.0 (or your "
                "CUDA torch) && pip install -e . --no-build-isolation"
            ) from e
        _ext = _C
    return _ext


def set_backend(name: str) -> None:
    """'llmcore' (the kernels) or 'reference' (every op through its pure-PyTorch reference)."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    return _backend


# Ops whose CUDA kernel is routed off: public op name (the function in llmcore.ops) -> why (the
# failing test or sanitizer report, the GPU, date and commit). On a CUDA tensor such an op runs its
# pure-PyTorch `<op>_reference` (rope_ runs rope_reference in place), with a RuntimeWarning the
# first time; CPU calls are unchanged. Empty: every kernel is enabled.
#   e.g. CUDA_DISABLED = {"flash_attn_varlen": "fwd NaN at 4096 sequences (H200, 2026-12-01, abc1234)"}
CUDA_DISABLED: dict = {}
_warned: set = set()


def use_reference(op: str, x: torch.Tensor) -> bool:
    """True when the public op `op` called on tensor `x` must run its `<op>_reference`: the
    'reference' backend, or `op` is in CUDA_DISABLED and x is on CUDA."""
    if _backend == "reference":
        return True
    if op in CUDA_DISABLED and x.is_cuda:
        if op not in _warned:
            _warned.add(op)
            warnings.warn(f"llmcore: {op} is routed off its CUDA kernel to {op.rstrip('_')}_reference "
                          f"(llmcore/ops/_lib.py CUDA_DISABLED): {CUDA_DISABLED[op]}", RuntimeWarning, stacklevel=3)
        return True
    return False


load_extension()
ops = torch.ops.llmcore
