"""A small, real demo of llmcore.ops on the CPU: checks each op against its reference on random
inputs and times it next to PyTorch. (Until the training pipeline lands, this is the quick start.)"""
import time

import torch

import llmcore
import llmcore.ops as lo


def bench(fn, *args, reps=20):
    fn(*args)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(*args)
    return (time.perf_counter() - t0) / reps * 1e3


def main():
    print("llmcore", llmcore.__version__, llmcore.build_info())
    torch.manual_seed(0)
    x = torch.randn(4096, 4096, requires_grad=True)
    w = torch.randn(4096, requires_grad=True)
    err = (lo.rms_norm(x, w) - lo.rms_norm_reference(x, w)).abs().max().item()
    print(f"rms_norm 4096x4096 fp32: max |llmcore - reference| = {err:.2e}")

    def fb(f):
        return lambda: torch.autograd.grad(f(x, w).sum(), (x, w))

    t_l = bench(fb(lo.rms_norm))
    t_r = bench(fb(lambda a, b: torch.nn.functional.rms_norm(a, (a.shape[-1],), b, 1e-6)))
    print(f"rms_norm fwd+bwd: llmcore {t_l:.1f} ms, torch eager {t_r:.1f} ms ({t_r / t_l:.2f}x)")


if __name__ == "__main__":
    main()
