"""llmcore: handwritten CUDA/CPU kernels as PyTorch custom ops, and a thin trainer for small LLMs.

`import llmcore.ops` for the kernels; `llmcore.build_info()` says how the extension was built.
"""
__version__ = "0.1.0"


def build_info() -> dict:
    """How the C++/CUDA extension was built: version, CPU ISA variants (and the one this CPU
    runs), CUDA architectures the kernels were compiled for, and whether CUDA bindings are in."""
    from llmcore.ops._lib import load_extension

    return dict(load_extension().build_info())
