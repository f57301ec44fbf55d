"""llmcore.ops — the kernels, as PyTorch custom ops (torch.ops.llmcore.*) with autograd.

Each op lives in llmcore/ops/<op>.py: the public function, its fake (meta) kernel, its autograd
formula and `<op>_reference`, the pure-PyTorch fp32 twin used as test oracle and benchmark
baseline. The C++/CUDA side of op <op> is in csrc/ops/<op>/.
"""
from llmcore.ops._lib import get_backend, set_backend  # noqa: F401  (loads the extension)
from llmcore.ops.rms_norm import add_rms_norm, add_rms_norm_reference, rms_norm, rms_norm_reference  # noqa: F401
from llmcore.ops.moe import (moe_aux_loss, moe_bias_update_, moe_combine, moe_combine_reference, moe_dispatch, moe_dispatch_reference, moe_route, moe_route_reference)  # noqa: F401
from llmcore.ops.nf4 import NF4Weight, nf4_dequantize, nf4_dequantize_reference, nf4_quantize, nf4_quantize_reference  # noqa: F401
from llmcore.ops.rope import rope, rope_, rope_cache, rope_frequencies, rope_reference  # noqa: F401
from llmcore.ops.qk_norm_rope import qk_norm_rope, qk_norm_rope_, qk_norm_rope_reference  # noqa: F401
from llmcore.ops.swiglu import swiglu, swiglu_packed, swiglu_packed_reference, swiglu_reference  # noqa: F401
from llmcore.ops.flash_attn import (  # noqa: F401
    flash_attn, flash_attn_reference, flash_attn_varlen, flash_attn_varlen_reference, flash_attn_with_kvcache,
    flash_attn_with_kvcache_reference)
from llmcore.ops.fused_linear_cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_reference  # noqa: F401
