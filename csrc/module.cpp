// module.cpp — the pybind11 module llmcore._C. Importing it runs the static TORCH_LIBRARY
// registrations of every op; the module itself only exposes build information.
#include <pybind11/pybind11.h>

#include <fstream>
#include <string>

#include "common/cpu_avx512bf16.h"
#include "common/cpu_gemm.h"
#include "common/cpu_utils.h"

#ifndef LLMCORE_VERSION
#define LLMCORE_VERSION "0.0.0"
#endif
#ifndef LLMCORE_CUDA_ARCHS
#define LLMCORE_CUDA_ARCHS ""
#endif

namespace py = pybind11;

// The clone the ifunc resolvers pick (common/cpu_utils.h): by ISA level, as GCC's resolver does.
static const char* selected_cpu_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return "x86-64-v4(avx512)";
  if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3(avx2+fma)";
  return "x86-64";
#else
  return "default";
#endif
}

// lscpu's "Model name": the first "model name" line of /proc/cpuinfo (every CPU figure names it).
static std::string cpu_model() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("model name", 0) == 0) {
      const auto c = line.find(':');
      const auto v = c == std::string::npos ? std::string::npos : line.find_first_not_of(" \t", c + 1);
      return v == std::string::npos ? "unknown" : line.substr(v);
    }
  return "unknown";
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "llmcore C++/CUDA extension: ops register under torch.ops.llmcore";
  m.def("build_info", []() {
    py::dict d;
    d["version"] = LLMCORE_VERSION;
    d["cpu_isa_variants"] = LLMCORE_CPU_ISA_VARIANTS;
    d["cpu_isa_selected"] = selected_cpu_isa();
    d["cpu_avx512bf16_path"] = llmcore::cpu_has_avx512bf16();  // bf16 kernels (common/cpu_avx512bf16.h)
    d["cpu_model"] = cpu_model();
    // the tile-GEMM engine of the bf16 / fp32 CPU flash attention (common/cpu_gemm.h), asked now
    d["cpu_gemm_bf16"] = llmcore::cpu_gemm_name(llmcore::cpu_gemm_engine(llmcore::DType::BFloat16));
    d["cpu_gemm_fp32"] = llmcore::cpu_gemm_name(llmcore::cpu_gemm_engine(llmcore::DType::Float32));
    d["cpu_gemm_env"] = llmcore::cpu_gemm_env();
#ifdef LLMCORE_WITH_CUDA
    d["cuda_bindings"] = true;
#else
    d["cuda_bindings"] = false;
#endif
    d["cuda_archs"] = LLMCORE_CUDA_ARCHS;
    return d;
  });
}
