"""llmcore.hf — llmcore's kernels inside Hugging Face transformers models (one call, in place).

    import llmcore.hf
    model = llmcore.hf.apply_kernels(model)                      # a loaded transformers causal LM
    model = llmcore.hf.AutoModelForCausalLM.from_pretrained(path)  # load (safetensors) and patch

patch.py: the per-family tables and the replaced forwards; attention.py: the "llmcore" entry of
transformers' attention registry; loss.py: the training loss (fused linear cross-entropy when the op exists).
"""
from llmcore.hf.patch import FAMILIES, AutoModelForCausalLM, apply_kernels  # noqa: F401
