"""MoE benchmarks: dispatch / combine bandwidth, and the whole MoEFeedForward layer (fwd+bwd).

Ops (providers: llmcore, reference, torch.compile(reference)):
  dispatch  reads x (T*H) and the ids, writes x_permuted (T*k*H) + row_map: GB/s vs the copy ceiling
  combine   reads y_permuted (T*k*H) + weights + row_map, writes y (T*H)
Layer fwd+bwd (providers: llmcore = MoEFeedForward; naive-loop = minimind's masked per-expert loop;
torch-scatter = argsort + index_select + per-expert matmuls + index_add_), same weights and routing.
Shapes: minimind-MoE (hidden 640 / 768, ffn 1728 / 2048, 4-8 experts, top-1/2, 1 shared expert) and
a DeepSeek-like one (E 64, k 6-8, hidden 2048, ffn 1408; GPU only for the layer: its fp32 weights
are 2.2 GB).
"""
import pytest
import torch

import llmcore.ops as lo
from bench.conftest import measure
from llmcore.nn import MoEFeedForward
from llmcore.nn.moe import moe_feed_forward_loop, moe_feed_forward_scatter

# (T, E, k, H) for the ops
OP_SHAPES = [(4096, 8, 2, 640), (4096, 64, 8, 2048), (16384, 4, 2, 768)]
# (T, hidden, ffn, E, k, shared) for the layer
LAYER_SHAPES = [(128, 640, 1728, 4, 2, 1), (2048, 640, 1728, 4, 2, 1), (2048, 768, 2048, 8, 1, 1), (2048, 768, 2048, 8, 2, 1),
                (4096, 2048, 1408, 64, 6, 2), (4096, 2048, 1408, 64, 8, 0)]

_compiled = {}


def _compile(fn):
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=False)
    return _compiled[fn]


def _inputs(T, E, k, H, dtype, device):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(T, E, generator=g)
    ids = torch.topk(logits, k, dim=-1).indices.to(torch.int32).to(device)
    x = torch.randn(T, H, generator=g).to(device=device, dtype=dtype)
    w = torch.rand(T, k, generator=g).to(device)
    return x, ids, w


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", OP_SHAPES)
@pytest.mark.parametrize("provider", ["llmcore", "reference", "torch.compile"])
@pytest.mark.parametrize("op", ["dispatch", "combine"])
def test_moe_ops(benchmark, device, op, provider, shape, dtype):
    T, E, k, H = shape
    if device == "cpu" and T * k * H > 16384 * 2 * 768:
        pytest.skip("large shapes are for the GPU")
    x, ids, w = _inputs(T, E, k, H, dtype, device)
    es = x.element_size()
    if op == "dispatch":
        fn = {"llmcore": lo.moe_dispatch, "reference": lo.moe_dispatch_reference,
              "torch.compile": _compile(lo.moe_dispatch_reference)}[provider]
        nbytes = T * H * es + T * k * H * es + 2 * T * k * 4

        def run():
            with torch.no_grad():
                fn(x, ids, E)
    else:
        row_map = lo.moe_dispatch(x, ids, E)[3]
        yp = torch.randn(T * k, H, device=device).to(dtype)
        fn = {"llmcore": lo.moe_combine, "reference": lo.moe_combine_reference,
              "torch.compile": _compile(lo.moe_combine_reference)}[provider]
        nbytes = T * k * H * es + T * H * es + T * k * 8

        def run():
            with torch.no_grad():
                fn(yp, w, row_map, T)
    measure(benchmark, run, op=f"moe_{op}", provider=provider, mode="fwd", shape=shape, dtype=dtype,
            device=device, nbytes=nbytes)


@pytest.mark.parametrize("shape", LAYER_SHAPES)
@pytest.mark.parametrize("provider", ["llmcore", "naive-loop", "torch-scatter"])
def test_moe_layer(benchmark, device, provider, shape):
    T, H, Fh, E, k, S = shape
    if device == "cpu" and E > 8:
        pytest.skip("DeepSeek-like layer shapes are for the GPU")
    if device == "cpu":  # 2 shared cores: 512 tokens keep a run short
        T = min(T, 512)
        shape = (T, *shape[1:])
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    m = MoEFeedForward(H, Fh, E, k, num_shared_experts=S, balance="none").to(device=device, dtype=dtype)
    x = torch.randn(T, H, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(T, H, device=device, dtype=dtype)
    fn = {"llmcore": m, "naive-loop": lambda v: moe_feed_forward_loop(m, v),
          "torch-scatter": lambda v: moe_feed_forward_scatter(m, v)}[provider]
    params = [x, *m.parameters()]

    def run():
        torch.autograd.grad(fn(x), params, dy, allow_unused=True)

    flops = 3 * 2 * T * (k * 3 * H * Fh + S * 3 * H * Fh + H * E)  # fwd + bwd (2x fwd) matmul FLOPs
    measure(benchmark, run, op="moe_layer", provider=provider, mode="fwd+bwd", shape=shape, dtype=dtype,
            device=device, flops=flops, rounds=5 if device == "cpu" else None)
