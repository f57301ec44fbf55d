// cpu_gemm.h — which engine runs the small tile GEMMs inside the CPU kernels, and the AMX engine.
//
// The CPU flash attention spends most of its time in 64 x 64 x D tile GEMMs. Three engines:
//   kFma         the fp32 tile path (flash_attn_cpu.cpp), vectorized per ISA clone (AVX-512 or AVX2+FMA,
//                picked by the loader: llmcore.build_info()["cpu_isa_selected"]); every dtype
//   kAvx512Bf16  bf16 operands with vdpbf16ps (flash_attn_bf16_cpu.cpp), 2x the fp32 FMA rate;
//                AMD Zen 4/5, Intel Cooper Lake and later
//   kAmx         bf16 operands on AMX tiles (Intel Sapphire Rapids and later) through ATen's
//                at::native::cpublas::brgemm, i.e. oneDNN's brgemm micro-kernel: the engine PyTorch's
//                own CPU flash attention uses; measured ~5x the vdpbf16ps rate at 64 x 64 x 64
//                (bench/RESULTS.md). The flash attention loop, softmax and packing stay ours.
// cpu_gemm_engine(dtype) is the best engine this CPU has for that dtype, capped by LLMCORE_CPU_GEMM
// (amx | avx512bf16 | avx512 | avx2; the last two both mean kFma: which ISA clone runs is the
// loader's choice), read once; the old switch LLMCORE_CPU_BF16_PATH=0 means avx512. An engine the
// CPU lacks is never chosen (a cap above the CPU is the CPU's best). The ATen layer asks before
// every launch (AMX availability can change: torch.backends.mkldnn.enabled) and passes the answer
// in the op's params, so kernels never throw from inside a parallel region.
// Numerics: every engine takes bf16 operands exactly and accumulates in fp32; only the order of the
// fp32 additions inside one tile GEMM differs, fixed per engine and shape (deterministic, thread-
// count independent).
#pragma once
#include <cstdint>

#include "common/dtype.h"

namespace llmcore {

enum class CpuGemm : int { kFma = 0, kAvx512Bf16 = 1, kAmx = 2 };

const char* cpu_gemm_name(CpuGemm e);
// The engine for tile GEMMs with operands of dtype `dt` (bf16 may get kAvx512Bf16 / kAmx; others kFma).
// Implemented in cpu_gemm_aten.cpp (needs ATen to ask oneDNN about AMX).
CpuGemm cpu_gemm_engine(DType dt);
// The cap LLMCORE_CPU_GEMM asked for (kAmx when unset), and the variable's text ("" when unset).
CpuGemm cpu_gemm_cap();
const char* cpu_gemm_env();

// AMX (kAmx only): C[M][N] (=|+=) A[M][K] B with A bf16 row-major (row stride lda elements), B bf16
// in VNNI pairs [K/2][ldb][2] (element (k, n) at b[(k / 2) * 2 * ldb + 2 * n + k % 2]), C fp32 (row
// stride ldc); K even (pad both operands with zeros). Each thread that called it calls
// amx_gemm_release() once before leaving its parallel range (frees the AMX tile state).
void amx_gemm_bf16(int64_t M, int64_t N, int64_t K, const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb,
                   float* c, int64_t ldc, bool accumulate);
void amx_gemm_release();

}  // namespace llmcore
