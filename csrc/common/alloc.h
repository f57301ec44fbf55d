// alloc.h — output allocation for the ATen layer (csrc/ops/*/*_aten.cpp) only.
//
// On CPU a large fresh output is dominated by its first-touch page faults, not by the kernel: the
// default allocator hands out allocations >= 32 MB as new mmap()s, and filling a 64 MB tensor
// costs ~27 ms in 4 KB faults against ~3 ms of writing (measured on the 2-core dev box, which made
// rms_norm at 4096 x 4096 run at 13% of the copy rate for every provider). empty_output() asks for
// transparent huge pages (madvise(MADV_HUGEPAGE) on the 2 MB-aligned interior) before the kernel
// writes, which cuts that to ~5 ms — the same thing PyTorch's THP_MEM_ALLOC_ENABLE=1 does for every
// allocation — but only for fresh memory (see advise_huge_pages). It is advice only: memory
// contents and semantics do not change, the call fails silently where THP is off ("never"), and it
// is a no-op on CUDA tensors and small outputs.
// LLMCORE_CPU_HUGEPAGES=0 turns it off (A/B measurements).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace llmcore {

inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool on = [] {
    const char* env = std::getenv("LLMCORE_CPU_HUGEPAGES");
    return !(env && std::strcmp(env, "0") == 0);
  }();
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t nbytes = t.nbytes();
  if (!on || !t.is_cpu() || nbytes < 4 * kHuge) return;
  const uintptr_t b = reinterpret_cast<uintptr_t>(t.data_ptr()), e = b + nbytes;
  const uintptr_t lo = (b + kHuge - 1) & ~(kHuge - 1), hi = e & ~(kHuge - 1);
  if (hi <= lo) return;
  // Only fresh memory (nothing mapped in yet: a new mmap) gains. Memory the allocator reuses is
  // already backed, and advising it anyway cost 1.3-1.7x on reused 10 MB outputs (VMA splits,
  // khugepaged collapsing pages under the kernel), so a resident first page means: leave it.
  unsigned char resident = 0;
  if (mincore(reinterpret_cast<void*>(lo), 4096, &resident) == 0 && (resident & 1)) return;
  (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// at::empty for a kernel output the kernel is about to write in full.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(sizes, opts);
  advise_huge_pages(t);
  return t;
}

}  // namespace llmcore
