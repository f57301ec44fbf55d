"""llmcore: handwritten CUDA/CPU kernels as PyTorch custom ops, and a thin trainer for small LLMs.

`import llmcore.ops` for the kernels; `llmcore.build_info()` says how the extension was built.
"""
__version__ = "0.1.0"


def build_info() -> dict:
    """How the C++/CUDA extension was built: version, CPU ISA variants (and the one this CPU
    runs), CUDA architectures the kernels were compiled for, and whether CUDA bindings are in.
    Also what this machine runs: `cpu_model` (lscpu's model name), `cpu_gemm_bf16` / `cpu_gemm_fp32`
    (the engine of the CPU flash attention's tile GEMMs: amx, avx512bf16 or fma; capped by
    LLMCORE_CPU_GEMM, whose value is `cpu_gemm_env`) and `cpu_gemm_aten` (the other CPU ops' GEMMs
    are ATen's: oneDNN / MKL pick AMX or AVX-512 themselves)."""
    from llmcore.ops._lib import load_extension

    import os

    info = dict(load_extension().build_info())
    info["cpu_gemm_aten"] = "oneDNN/MKL" + (f" (ONEDNN_MAX_CPU_ISA={os.environ['ONEDNN_MAX_CPU_ISA']})"
                                           if os.environ.get("ONEDNN_MAX_CPU_ISA") else "")  # set by the user
    return info
