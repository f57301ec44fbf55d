"""What one oneDNN brgemm call (ATen's at::native::cpublas::brgemm, the AMX engine of
csrc/common/cpu_gemm.h) costs at the CPU flash attention's tile shapes, one thread, and what a
change of shape between two calls costs (the tile reconfiguration that made the AMX forward group
its key blocks). Builds a throwaway extension with torch.utils.cpp_extension (~30 s).

    python bench/cpu_brgemm_probe.py
"""
import tempfile

import torch
from torch.utils.cpp_extension import load_inline

SRC = r"""
#include <torch/extension.h>
#include <ATen/native/CPUBlas.h>
#include <chrono>
using at::native::cpublas::brgemm;
// mode 0: the same call twice per iteration; 1: the second with add_C; 2: the second with another K
double per_call(torch::Tensor A, torch::Tensor B, torch::Tensor C, int64_t M, int64_t N, int64_t K, int64_t iters,
                int64_t mode) {
  auto a = (const at::BFloat16*)A.data_ptr(); auto b = (const at::BFloat16*)B.data_ptr(); float* c = C.data_ptr<float>();
  brgemm(M, N, K, K, N, N, false, a, b, c, true);
  auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < iters; ++i) {
    brgemm(M, N, K, K, N, N, false, a, b, c, true);
    brgemm(M, N, mode == 2 ? K / 2 : K, K, N, N, mode == 1, a, b, c, true);
  }
  auto t1 = std::chrono::steady_clock::now();
  at::native::cpublas::brgemm_release(true);
  return std::chrono::duration<double>(t1 - t0).count() / iters / 2;
}
bool amx() { return at::native::cpublas::could_pack(at::kBFloat16); }
"""


def main():
    torch.set_num_threads(1)
    m = load_inline("llmcore_brgemm_probe", cpp_sources=SRC, functions=["per_call", "amx"],
                    extra_cflags=["-O2"], build_directory=tempfile.mkdtemp())
    import llmcore
    print(f"{llmcore.build_info()['cpu_model']}; oneDNN bf16 brgemm on AMX: {m.amx()}; one thread")
    for M, N, K in [(64, 64, 64), (64, 64, 128), (64, 128, 64)]:
        A = torch.randn(M, K).bfloat16()
        Bm = torch.randn(K, N).bfloat16()
        Bv = Bm.view(K // 2, 2, N).transpose(1, 2).contiguous()  # VNNI pairs [K/2][N][2]
        C = torch.empty(M, N)
        same = min(m.per_call(A, Bv, C, M, N, K, 5000, 0) for _ in range(3))
        err = (C - A.float() @ Bm.float()).abs().max().item()
        add = min(m.per_call(A, Bv, C, M, N, K, 5000, 1) for _ in range(3))
        otherk = min(m.per_call(A, Bv, C, M, N, K, 5000, 2) for _ in range(3))
        print(f"  {M}x{N}x{K}: {same * 1e9:.0f} ns/call ({2 * M * N * K / same / 1e9:.0f} GFLOP/s, max err {err:.1e}); "
              f"alternating with add_C {add * 1e9:.0f} ns/call, with another K {otherk * 1e9:.0f} ns/call")


if __name__ == "__main__":
    main()
