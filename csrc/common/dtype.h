// dtype.h — the torch-free dtype tag that crosses from the ATen layer into kernels.
#pragma once
#include <cstdint>

namespace llmcore {

enum class DType : int32_t { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::Float32: return "float32";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
    case DType::Float64: return "float64";
  }
  return "?";
}

}  // namespace llmcore
