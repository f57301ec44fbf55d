// nf4_aten.cpp — ATen layer of nf4_quantize_fwd / nf4_double_quant_fwd / nf4_dequantize_fwd: checks,
// allocation, device guard, stream, and the CPU (always) and CUDA (LLMCORE_WITH_CUDA) registrations.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/alloc.h"
#include "common/checks.h"
#include "nf4/nf4.h"

namespace llmcore {
namespace {

void check_blocksize(int64_t blocksize) {
  const bool pow2 = blocksize > 0 && (blocksize & (blocksize - 1)) == 0;
  LLMCORE_CHECK(pow2 && blocksize >= 32 && blocksize <= 4096,
                "argument 'blocksize' must be a power of two in [32, 4096] (bitsandbytes' sizes), got ", blocksize);
}

void check_fp32(const at::Tensor& t, const char* name) {
  check_defined(t, name);
  LLMCORE_CHECK(t.scalar_type() == at::kFloat, "argument '", name, "' must be float32, got ", t.scalar_type());
}

void check_u8(const at::Tensor& t, const char* name) {
  check_defined(t, name);
  LLMCORE_CHECK(t.scalar_type() == at::kByte, "argument '", name, "' must be uint8, got ", t.scalar_type());
}

void check_numel(const at::Tensor& t, const char* name, int64_t numel) {
  LLMCORE_CHECK(t.numel() == numel, "argument '", name, "' must have ", numel, " elements, got shape ", t.sizes());
}

// CPU grain: about 32K values per task.
int64_t grain_blocks(int64_t blocksize) { return std::max<int64_t>(1, 32768 / blocksize); }

std::tuple<at::Tensor, at::Tensor> nf4_quantize_fwd(const at::Tensor& w, int64_t blocksize) {
  check_defined(w, "w");
  const auto s = w.scalar_type();
  LLMCORE_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16,
                "argument 'w' must be float32, float16 or bfloat16, got ", s);
  LLMCORE_CHECK(w.numel() > 0, "argument 'w' must be non-empty, got shape ", w.sizes());
  check_blocksize(blocksize);
  const at::Tensor wc = w.contiguous();
  const int64_t n = wc.numel(), nblocks = (n + blocksize - 1) / blocksize;
  at::Tensor packed = at::empty({(n + 1) / 2}, w.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nblocks}, w.options().dtype(at::kFloat));
  Nf4QuantizeParams p;
  p.w = wc.data_ptr();
  p.packed = packed.data_ptr<uint8_t>();
  p.absmax = absmax.data_ptr<float>();
  p.n = n;
  p.blocksize = blocksize;
  p.dtype = to_dtype(s);
  if (w.is_cpu()) {
    at::parallel_for(0, nblocks, grain_blocks(blocksize), [&](int64_t b, int64_t e) { nf4_quantize_cpu(p, b, e); });
    return {packed, absmax};
  }
#ifdef LLMCORE_WITH_CUDA
  const c10::cuda::CUDAGuard guard(w.device());
  LLMCORE_CUDA_CHECK(nf4_quantize_cuda(p, at::cuda::getCurrentCUDAStream()), "nf4_quantize_cuda");
  return {packed, absmax};
#else
  LLMCORE_CHECK(false, "nf4: llmcore was built without CUDA support, got a tensor on ", w.device());
#endif
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> nf4_double_quant_fwd(const at::Tensor& absmax, const at::Tensor& code2) {
  check_fp32(absmax, "absmax");
  check_fp32(code2, "code2");
  check_same_device(absmax, "absmax", code2, "code2");
  check_dim(absmax, "absmax", 1);
  LLMCORE_CHECK(absmax.numel() > 0, "argument 'absmax' must be non-empty");
  check_shape(code2, "code2", {256});
  const at::Tensor a = absmax.contiguous(), c = code2.contiguous();
  const int64_t nblocks = a.numel(), nblocks2 = (nblocks + kNf4Blocksize2 - 1) / kNf4Blocksize2;
  // bitsandbytes: offset = absmax.mean() — torch's own reduction, so the bits match on each device
  at::Tensor offset = a.mean();
  at::Tensor qabsmax = at::empty({nblocks}, a.options().dtype(at::kByte));
  at::Tensor absmax2 = at::empty({nblocks2}, a.options());
  Nf4DoubleQuantParams p;
  p.absmax = a.data_ptr<float>();
  p.offset = offset.data_ptr<float>();
  p.code2 = c.data_ptr<float>();
  p.qabsmax = qabsmax.data_ptr<uint8_t>();
  p.absmax2 = absmax2.data_ptr<float>();
  p.nblocks = nblocks;
  if (a.is_cpu()) {
    at::parallel_for(0, nblocks2, 16, [&](int64_t b, int64_t e) { nf4_double_quant_cpu(p, b, e); });
    return {qabsmax, absmax2, offset};
  }
#ifdef LLMCORE_WITH_CUDA
  const c10::cuda::CUDAGuard guard(a.device());
  LLMCORE_CUDA_CHECK(nf4_double_quant_cuda(p, at::cuda::getCurrentCUDAStream()), "nf4_double_quant_cuda");
  return {qabsmax, absmax2, offset};
#else
  LLMCORE_CHECK(false, "nf4: llmcore was built without CUDA support, got a tensor on ", a.device());
#endif
}

at::Tensor nf4_dequantize_fwd(const at::Tensor& packed, const at::Tensor& absmax,
                              const c10::optional<at::Tensor>& absmax2, const c10::optional<at::Tensor>& code2,
                              const c10::optional<at::Tensor>& offset, int64_t blocksize, at::IntArrayRef shape,
                              at::ScalarType dtype) {
  check_u8(packed, "packed");
  check_defined(absmax, "absmax");
  check_same_device(packed, "packed", absmax, "absmax");
  check_blocksize(blocksize);
  LLMCORE_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
                    (dtype == at::kDouble && packed.is_cpu()),
                "argument 'dtype' must be float32, float16 or bfloat16", packed.is_cpu() ? " (or float64 on CPU)" : "",
                ", got ", dtype);
  int64_t n = 1;
  for (int64_t d : shape) {
    LLMCORE_CHECK(d >= 0, "argument 'shape' must have non-negative sizes, got ", shape);
    n *= d;
  }
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  check_numel(packed, "packed", (n + 1) / 2);
  check_numel(absmax, "absmax", nblocks);
  const bool dq = absmax2.has_value();
  LLMCORE_CHECK(dq == code2.has_value() && dq == offset.has_value(),
                "arguments 'absmax2', 'code2' and 'offset' must be given together (double quant) or all be None");
  at::Tensor pk = packed.contiguous(), am = absmax.contiguous(), a2, c2, off;
  if (dq) {
    check_u8(absmax, "absmax");  // the 8-bit qabsmax
    check_fp32(*absmax2, "absmax2");
    check_fp32(*code2, "code2");
    check_fp32(*offset, "offset");
    check_same_device(packed, "packed", *absmax2, "absmax2");
    check_same_device(packed, "packed", *code2, "code2");
    check_same_device(packed, "packed", *offset, "offset");
    check_numel(*absmax2, "absmax2", (nblocks + kNf4Blocksize2 - 1) / kNf4Blocksize2);
    check_numel(*code2, "code2", 256);
    check_numel(*offset, "offset", 1);
    a2 = absmax2->contiguous();
    c2 = code2->contiguous();
    off = offset->contiguous();
  } else {
    check_fp32(absmax, "absmax");
  }
  at::Tensor out = empty_output(shape, packed.options().dtype(dtype));
  if (n == 0) return out;
  Nf4DequantParams p;
  p.absmax = dq ? nullptr : am.data_ptr<float>();
  p.qabsmax = dq ? am.data_ptr<uint8_t>() : nullptr;
  p.absmax2 = dq ? a2.data_ptr<float>() : nullptr;
  p.code2 = dq ? c2.data_ptr<float>() : nullptr;
  p.offset = dq ? off.data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
  p.n = n;
  p.blocksize = blocksize;
  p.out_dtype = to_dtype(dtype);
  if (packed.is_cpu()) {
    p.packed = pk.data_ptr<uint8_t>();
    at::parallel_for(0, nblocks, grain_blocks(blocksize), [&](int64_t b, int64_t e) { nf4_dequantize_cpu(p, b, e); });
    return out;
  }
#ifdef LLMCORE_WITH_CUDA
  const c10::cuda::CUDAGuard guard(packed.device());
  if (reinterpret_cast<uintptr_t>(pk.data_ptr()) & 3u) pk = pk.clone();  // a view at an odd offset
  p.packed = pk.data_ptr<uint8_t>();
  LLMCORE_CUDA_CHECK(nf4_dequantize_cuda(p, at::cuda::getCurrentCUDAStream()), "nf4_dequantize_cuda");
  return out;
#else
  LLMCORE_CHECK(false, "nf4: llmcore was built without CUDA support, got a tensor on ", packed.device());
#endif
}

}  // namespace

TORCH_LIBRARY_IMPL(llmcore, CPU, m) {
  m.impl("nf4_quantize_fwd", &nf4_quantize_fwd);
  m.impl("nf4_double_quant_fwd", &nf4_double_quant_fwd);
  m.impl("nf4_dequantize_fwd", &nf4_dequantize_fwd);
}

#ifdef LLMCORE_WITH_CUDA
TORCH_LIBRARY_IMPL(llmcore, CUDA, m) {
  m.impl("nf4_quantize_fwd", &nf4_quantize_fwd);
  m.impl("nf4_double_quant_fwd", &nf4_double_quant_fwd);
  m.impl("nf4_dequantize_fwd", &nf4_dequantize_fwd);
}
#endif

}  // namespace llmcore
