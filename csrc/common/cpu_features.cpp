// cpu_features.cpp — run-time CPU feature checks shared by the CPU kernels.
#include <cstdlib>
#include <cstring>

#include "common/cpu_avx512bf16.h"

namespace llmcore {

bool cpu_has_avx512bf16() {
#ifdef LLMCORE_HAVE_AVX512BF16_PATH
  static const bool on = [] {
    const char* env = std::getenv("LLMCORE_CPU_BF16_PATH");
    if (env && std::strcmp(env, "0") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("fma");
  }();
  return on;
#else
  return false;
#endif
}

}  // namespace llmcore
