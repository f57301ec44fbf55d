// swiglu.h — torch-free launcher declarations for swiglu and swiglu_packed.
//
//   y     = silu(g) * u = g * sig(g) * u,           sig(g) = 1 / (1 + exp(-g))
//   dg    = (dy * u) * sig(g) * (1 + g * (1 - sig(g)))    (PyTorch's silu_backward formula)
//   du    = dy * silu(g)
// The backward recomputes sig(g) from g: nothing but the inputs is saved.
// Packed: gate_up (rows, 2F) = [gate | up]; the same kernels run on the two strided halves
// (row stride 2F), and the backward writes [dgate | dup] into one (rows, 2F) gradient.
// Numerics: fp32 math (fp64 on CPU for float64), one rounding per output. exp overflow is benign
// (sig -> 0, silu -> -0); inf / -inf / NaN propagate as in F.silu(g) * u: silu(-inf) = NaN,
// silu(inf) = inf.
#pragma once
#include <cstdint>

#include "common/dtype.h"

#if defined(__CUDACC__) || defined(LLMCORE_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace llmcore {

struct SwigluParams {
  // (rows, n) matrices with unit column stride; row strides in elements.
  const void* gate;  // (rows, n), row stride gate_rs
  const void* up;    // (rows, n), row stride up_rs
  void* y = nullptr;           // fwd: (rows, n) contiguous
  const void* dy = nullptr;    // bwd: (rows, n) contiguous
  void* dgate = nullptr;       // bwd: (rows, n), row stride dgate_rs
  void* dup = nullptr;         // bwd: (rows, n), row stride dup_rs
  int64_t gate_rs = 0, up_rs = 0, dgate_rs = 0, dup_rs = 0;
  int64_t rows = 0, n = 0;
  DType dtype = DType::Float32;
};

// The CPU kernels walk a flat element range [i, end) of the (rows, n) space as row segments:
// the segment starting at i, as element offsets into each operand, its length, and whether its
// rows are strided and another row of the range follows (then the kernels prefetch that row: the
// hardware prefetcher restarts at every row jump of a packed [gate | up] layout).
struct SwigluSegment {
  int64_t len, gate, up, out, dgate, dup;
  bool prefetch_next;
  int64_t gate_next, up_next;  // offsets of the same columns one row down
};
inline SwigluSegment swiglu_segment(const SwigluParams& p, int64_t i, int64_t end) {
  const int64_t r = i / p.n, c = i - r * p.n;
  SwigluSegment s;
  s.len = (p.n - c) < (end - i) ? (p.n - c) : (end - i);
  s.gate = r * p.gate_rs + c, s.up = r * p.up_rs + c, s.out = r * p.n + c;
  s.dgate = r * p.dgate_rs + c, s.dup = r * p.dup_rs + c;
  s.prefetch_next = p.gate_rs != p.n && i + s.len < end;
  s.gate_next = s.gate + p.gate_rs, s.up_next = s.up + p.up_rs;
  return s;
}

// CPU (swiglu_cpu.cpp): the elements [begin, end) of the row-major (rows, n) index space.
void swiglu_fwd_cpu(const SwigluParams& p, int64_t begin, int64_t end);
void swiglu_bwd_cpu(const SwigluParams& p, int64_t begin, int64_t end);
// bfloat16 on CPUs with AVX512-BF16 (swiglu_avx512bf16_cpu.cpp); the two above dispatch to them.
void swiglu_fwd_cpu_avx512bf16(const SwigluParams& p, int64_t begin, int64_t end);
void swiglu_bwd_cpu_avx512bf16(const SwigluParams& p, int64_t begin, int64_t end);

#if defined(__CUDACC__) || defined(LLMCORE_WITH_CUDA)
cudaError_t swiglu_fwd_cuda(const SwigluParams& p, cudaStream_t stream);
cudaError_t swiglu_bwd_cuda(const SwigluParams& p, cudaStream_t stream);
#endif

}  // namespace llmcore
