// cpu_gemm_aten.cpp — the engine choice and the AMX engine of common/cpu_gemm.h, over ATen:
// at::native::cpublas::could_pack tells whether oneDNN's brgemm runs bf16 on AMX here, and
// at::native::cpublas::brgemm is the AMX micro-kernel (oneDNN ukernel, cached per shape per thread).
#include <ATen/native/CPUBlas.h>

#include <cstdlib>
#include <cstring>

#include "common/cpu_avx512bf16.h"
#include "common/cpu_gemm.h"

namespace llmcore {

const char* cpu_gemm_name(CpuGemm e) {
  switch (e) {
    case CpuGemm::kAmx: return "amx";
    case CpuGemm::kAvx512Bf16: return "avx512bf16";
    case CpuGemm::kFma: break;
  }
  return "fma";
}

const char* cpu_gemm_env() {
  const char* env = std::getenv("LLMCORE_CPU_GEMM");
  return env ? env : "";
}

CpuGemm cpu_gemm_cap() {
  static const CpuGemm cap = [] {
    const char* env = std::getenv("LLMCORE_CPU_GEMM");
    if (env && *env) {
      if (!std::strcmp(env, "amx")) return CpuGemm::kAmx;
      if (!std::strcmp(env, "avx512bf16")) return CpuGemm::kAvx512Bf16;
      // avx512 / avx2 (and anything else, which llmcore/__init__.py refuses before we get here)
      return CpuGemm::kFma;
    }
    const char* old = std::getenv("LLMCORE_CPU_BF16_PATH");
    if (old && !std::strcmp(old, "0")) return CpuGemm::kFma;
    return CpuGemm::kAmx;
  }();
  return cap;
}

CpuGemm cpu_gemm_engine(DType dt) {
  if (dt != DType::BFloat16) return CpuGemm::kFma;
  const CpuGemm cap = cpu_gemm_cap();
  if (cap == CpuGemm::kAmx && at::native::cpublas::could_pack(at::kBFloat16)) return CpuGemm::kAmx;
  if (cap >= CpuGemm::kAvx512Bf16 && cpu_has_avx512bf16()) return CpuGemm::kAvx512Bf16;
  return CpuGemm::kFma;
}

void amx_gemm_bf16(int64_t M, int64_t N, int64_t K, const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb,
                   float* c, int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, reinterpret_cast<const at::BFloat16*>(a),
                              reinterpret_cast<const at::BFloat16*>(b), c, /*is_vnni=*/true);
}

void amx_gemm_release() { at::native::cpublas::brgemm_release(/*is_vnni=*/true); }

}  // namespace llmcore
