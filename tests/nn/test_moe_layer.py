"""MoEFeedForward against a naive per-token loop, its torch peers, and its balancing contract."""
import pytest
import torch
import torch.nn.functional as F

import llmcore.ops as lo
from llmcore.nn import MoEFeedForward
from llmcore.nn.moe import moe_feed_forward_loop, moe_feed_forward_scatter
from tests.conftest import DEVICES, assert_close, make

CONFIGS = [  # hidden, ffn, E, k, shared, score, balance
    (32, 48, 4, 2, 1, "softmax", "aux"),
    (24, 40, 8, 1, 0, "sigmoid", "bias"),
    (16, 24, 16, 8, 2, "softmax", "none"),
    (40, 16, 64, 6, 1, "sigmoid", "aux"),
]


def per_token_reference(layer, x):
    """y[t] = sum_s w[t,s] * expert_{ids[t,s]}(x[t]) + shared(x[t]), one token at a time."""
    H, Fh = layer.hidden, layer.ffn_hidden
    x2 = x.reshape(-1, H)
    logits = F.linear(x2, layer.gate.weight)
    bias = layer.expert_bias if layer.balance == "bias" else None
    w, ids = lo.moe_route_reference(logits, layer.top_k, layer.score, layer.renormalize, bias)
    rows = []
    for t in range(x2.shape[0]):
        acc = torch.zeros(H, dtype=x.dtype)
        for s in range(layer.top_k):
            e = int(ids[t, s])
            h = layer.gate_up_proj[e] @ x2[t]
            acc = acc + w[t, s].to(x.dtype) * (layer.down_proj[e] @ (F.silu(h[:Fh]) * h[Fh:]))
        if layer.shared_gate_up is not None:
            g, u = (layer.shared_gate_up.weight @ x2[t]).chunk(2)
            acc = acc + layer.shared_down.weight @ (F.silu(g) * u)
        rows.append(acc)
    return torch.stack(rows).view(x.shape)


def _layer(cfg, dtype=torch.float32, device="cpu", seed=0):
    H, Fh, E, k, S, score, balance = cfg
    torch.manual_seed(seed)
    m = MoEFeedForward(H, Fh, E, k, num_shared_experts=S, score=score, balance=balance, aux_loss_coef=0.1)
    if balance == "bias":
        m.expert_bias.copy_(torch.randn(E) * 0.05)
    return m.to(device=device, dtype=dtype)


def _grads(m, x, y, dy):
    params = [x] + [p for p in m.parameters()]
    return torch.autograd.grad(y, params, dy)


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_layer_matches_per_token_loop(cfg, dtype):
    m = _layer(cfg, dtype)
    x = make((3, 7, cfg[0]), dtype, "cpu", seed=1, requires_grad=True)  # T = 21
    y = m(x)
    yr = per_token_reference(m, x)
    dy = make(y.shape, dtype, "cpu", seed=2)
    tol = dict(atol=1e-10, rtol=1e-9) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    assert y.shape == x.shape and y.dtype == dtype
    assert_close(y, yr, **tol, name="y")
    for g, gr, n in zip(_grads(m, x, y, dy), _grads(m, x, yr, dy), ["x"] + [n for n, _ in m.named_parameters()]):
        assert_close(g, gr, **tol, name=f"grad {n}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", CONFIGS[:2])
def test_layer_matches_torch_peers(device, cfg):
    m = _layer(cfg, torch.float32, device)
    x = make((2, 33, cfg[0]), torch.float32, device, seed=3, requires_grad=True)
    y = m(x)
    dy = make(y.shape, torch.float32, device, seed=4)
    g = _grads(m, x, y, dy)
    for peer in (moe_feed_forward_loop, moe_feed_forward_scatter):
        yp = peer(m, x)
        assert_close(y, yp, atol=2e-5, rtol=2e-5, name=peer.__name__)
        for a, b in zip(g, _grads(m, x, yp, dy)):
            assert_close(a, b, atol=5e-5, rtol=5e-5, name=f"{peer.__name__} grad")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_low_precision(device, dtype):
    cfg = CONFIGS[0]
    m32 = _layer(cfg, torch.float32, device)
    m = _layer(cfg, dtype, device)
    x = make((4, 16, cfg[0]), dtype, device, seed=5)
    y = m(x)
    with torch.no_grad():  # fp32 reference on the same (rounded) parameters and routing
        m32.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
        yr = m32(x.float())
        yb = moe_feed_forward_loop(m, x)  # PyTorch's own computation in the low dtype
    assert y.dtype == dtype
    assert_close(y, yr, yb, name="y")


def test_zero_token_experts_get_zero_grads():
    m = _layer((16, 8, 8, 1, 0, "softmax", "none"))
    with torch.no_grad():
        m.gate.weight.zero_()
        m.gate.weight[2, 0] = 5.0  # every token with x[:, 0] > 0 -> expert 2, the rest -> expert 0 (tie, lower id)
    x = make((9, 16), torch.float32, "cpu", requires_grad=True)
    y = m(x)
    gu, dn = torch.autograd.grad(y.sum(), (m.gate_up_proj, m.down_proj))
    used = set(m.expert_load.nonzero().flatten().tolist())
    assert used <= {0, 2}
    for e in range(8):
        if e not in used:
            assert not gu[e].any() and not dn[e].any()
    assert_close(y, per_token_reference(m, x), atol=2e-5, rtol=2e-5)


def test_aux_loss_attribute():
    cfg = (32, 48, 4, 2, 1, "softmax", "aux")
    m = _layer(cfg)
    x = make((2, 10, 32), torch.float32, "cpu", seed=6)
    m(x)
    logits = m.gate(x.reshape(-1, 32))
    _, ids = lo.moe_route(logits, 2)
    assert_close(m.aux_loss, 0.1 * lo.moe_aux_loss(logits, ids, seq_len=10))
    (g,) = torch.autograd.grad(m.aux_loss, m.gate.weight)
    assert g.abs().sum() > 0, "the aux loss must train the router"
    m.seq_aux = False
    m(x.reshape(20, 32))
    assert_close(m.aux_loss, 0.1 * lo.moe_aux_loss(logits, ids))
    m.eval()
    m(x)
    assert m.aux_loss.item() == 0.0
    m2 = _layer((32, 48, 4, 2, 1, "softmax", "none"))
    m2(x)
    assert m2.aux_loss.item() == 0.0 and m2.aux_loss.dim() == 0


def test_bias_balance_moves_load_toward_balance():
    torch.manual_seed(0)
    H, E = 16, 8
    m = MoEFeedForward(H, 8, E, 2, balance="bias", score="sigmoid")
    with torch.no_grad():
        m.gate.weight.normal_(0, 0.3)
        m.gate.weight[:2] += 1.0   # experts 0 and 1 dominate for x with a positive mean
    x = torch.randn(512, H) * 0.5 + 1.0

    def imbalance():
        m.reset_load()
        m(x)
        load = m.expert_load.float()
        return (load.max() / load.mean()).item()

    start = imbalance()
    m(x)  # two forwards counted (gradient accumulation) before one update
    assert int(m.expert_load.sum()) == 2 * 2 * 512
    for _ in range(200):
        m.update_bias(0.01)
        assert int(m.expert_load.sum()) == 0
        m(x)
    end = imbalance()
    assert start > 2.5 and end < 1.5, f"max/mean load {start:.2f} -> {end:.2f}"
    assert m.expert_bias[:2].max() < 0 < m.expert_bias[2:].max()
    assert "expert_bias" in m.state_dict() and "expert_load" not in m.state_dict()


def test_token_major_input_and_empty():
    m = _layer(CONFIGS[0])
    x = make((13, 32), torch.float32, "cpu", seed=8)
    assert_close(m(x), per_token_reference(m, x), atol=2e-5, rtol=2e-5)
    e = torch.empty(0, 32, requires_grad=True)
    y = m(e)
    assert y.shape == (0, 32)
    y.sum().backward()


def test_bad_config_errors():
    with pytest.raises(ValueError, match="balance must be one of"):
        MoEFeedForward(8, 8, 4, 2, balance="loss")
    with pytest.raises(ValueError, match="top_k must be in"):
        MoEFeedForward(8, 8, 4, 5)
    with pytest.raises(ValueError, match="score must be"):
        MoEFeedForward(8, 8, 4, 2, score="relu")


def test_trains_on_a_toy_task():
    """A few AdamW steps lower the loss (aux loss added the way a trainer does it)."""
    torch.manual_seed(0)
    m = MoEFeedForward(16, 32, 4, 2, num_shared_experts=1)
    x = torch.randn(64, 16)
    target = torch.tanh(x @ torch.randn(16, 16))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = F.mse_loss(m(x), target)
        losses.append(loss.item())
        (loss + m.aux_loss).backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < 0.5 * losses[0]
