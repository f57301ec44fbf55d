// checks.h — input checks for the ATen layer (csrc/ops/*/*_aten.cpp) only.
// Every message names the argument and says expected vs actual.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "common/dtype.h"

namespace llmcore {

#define LLMCORE_CHECK(cond, ...) TORCH_CHECK(cond, "llmcore: ", __VA_ARGS__)

inline void check_defined(const at::Tensor& t, const char* name) {
  LLMCORE_CHECK(t.defined(), "argument '", name, "' is an undefined tensor");
}

// Floating dtypes a kernel accepts: fp32/fp16/bf16 everywhere, fp64 on CPU (gradcheck).
inline void check_float(const at::Tensor& t, const char* name) {
  check_defined(t, name);
  auto s = t.scalar_type();
  bool ok = s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || (s == at::kDouble && t.is_cpu());
  LLMCORE_CHECK(ok, "argument '", name, "' must be float32, float16 or bfloat16",
                t.is_cpu() ? " (or float64 on CPU)" : "", ", got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  LLMCORE_CHECK(a.device() == b.device(), "arguments '", an, "' and '", bn,
                "' must be on the same device, got ", a.device(), " and ", b.device());
}

inline void check_same_dtype(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  LLMCORE_CHECK(a.scalar_type() == b.scalar_type(), "arguments '", an, "' and '", bn,
                "' must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
}

inline void check_dim(const at::Tensor& t, const char* name, int64_t dim) {
  LLMCORE_CHECK(t.dim() == dim, "argument '", name, "' must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  LLMCORE_CHECK(t.sizes() == shape, "argument '", name, "' must have shape ", shape, ", got ", t.sizes());
}

inline DType to_dtype(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return DType::Float32;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    case at::kDouble: return DType::Float64;
    default: TORCH_CHECK(false, "llmcore: unsupported dtype ", s);
  }
}

// A (rows, n) view of t with unit stride in the last dim: a view when possible, else a copy.
inline at::Tensor as_rows(const at::Tensor& t, int64_t n) {
  at::Tensor r = t.reshape({-1, n});
  if (r.size(0) > 0 && n > 1 && r.stride(1) != 1) r = r.contiguous();
  return r;
}

}  // namespace llmcore

#ifdef LLMCORE_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#define LLMCORE_CUDA_CHECK(expr, what)                                                    \
  do {                                                                                    \
    cudaError_t err__ = (expr);                                                           \
    TORCH_CHECK(err__ == cudaSuccess, "llmcore: ", what, " failed: ", cudaGetErrorString(err__)); \
  } while (0)
#endif
