"""Training-step throughput: one optimizer step (forward + backward + AdamW) of the whole model.

Providers: llmcore (the model on llmcore.ops), torch (the same model in plain PyTorch: F.rms_norm,
manual RoPE, SDPA, F.silu), torch.compile(torch). CPU: preset tiny, bf16 autocast, batch 8 x 256
with packed documents off (dense causal). CUDA: minimind-26m and minimind-104m, bf16, batch 32 x 512;
the rate column is model TFLOP/s (6N + attention per token, Transformer.flops_per_token), i.e. MFU
against the measured bf16 matmul ceiling printed next to it.

    python -m pytest bench/bench_train_step.py -q -s
"""
import pytest
import torch

from bench.conftest import measure
from llmcore.model import Transformer, get_config
from llmcore.train.optim import build_optimizer

PROVIDERS = ["llmcore", "torch", "torch.compile"]


def cases(device):
    if device == "cuda":
        return [("minimind-26m", 32, 512), ("minimind-104m", 16, 512)]
    return [("tiny", 8, 256)]


def make_step(preset, batch, seq, device, provider):
    torch.manual_seed(0)
    backend = "llmcore" if provider == "llmcore" else "torch"
    model = Transformer(get_config(preset, backend=backend, max_seq_len=seq)).to(device)
    opt = build_optimizer(model, 1e-4)
    ids = torch.randint(0, model.cfg.vocab_size, (batch, seq), device=device)
    fwd = torch.compile(model) if provider == "torch.compile" else model

    def step():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            _, loss = fwd(ids, labels=ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", [0, 1])
def test_train_step(benchmark, device, provider, case):
    cs = cases(device)
    if case >= len(cs):
        pytest.skip("one case on this device")
    preset, batch, seq = cs[case]
    model, step = make_step(preset, batch, seq, device, provider)
    tokens = batch * seq
    med = measure(benchmark, step, op=f"train_step {preset}", provider=provider, mode="fwd+bwd+adamw",
                  shape=(batch, seq), dtype=torch.bfloat16, device=device, flops=model.flops_per_token(seq) * tokens,
                  rounds=20 if device == "cuda" else 3)
    benchmark.extra_info["tokens/s"] = round(tokens / med)
    print(f"\n{preset} {provider}: {tokens / med:,.0f} tokens/s ({med * 1e3:.1f} ms/step)")
