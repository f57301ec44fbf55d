"""moe_route / moe_dispatch / moe_combine against their references, plus the balancing helpers.

Index outputs (ids, counts, offsets, row_map, the permutation itself) must match exactly;
weights and combined rows follow tests/conftest.py's tolerance rule.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llmcore.ops as lo
from tests.conftest import DEVICES, DTYPES, assert_close, make

ROUTE_CASES = [(1, 4, 1), (7, 4, 2), (127, 8, 2), (33, 64, 8), (1025, 16, 6), (5, 8, 8), (64, 256, 8)]


def _ids(T, E, k, device, seed=0, skew=None):
    """k distinct expert ids per token (optionally skewed toward low ids)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.ones(T, E) if skew is None else torch.exp(-skew * torch.arange(E, dtype=torch.float32)).expand(T, E)
    return torch.multinomial(w, k, replacement=False, generator=g).to(torch.int32).to(device)


# ---------------------------------------------------------------- route
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E,k", ROUTE_CASES)
@pytest.mark.parametrize("score,renormalize,with_bias", [("softmax", True, False), ("softmax", False, False),
                                                         ("sigmoid", True, True), ("sigmoid", False, False),
                                                         ("softmax", True, True)])
def test_route_matches_reference(device, dtype, T, E, k, score, renormalize, with_bias):
    logits = make((T, E), dtype, device, seed=T + E, scale=2.0, requires_grad=True)
    bias = make((E,), torch.float32, device, seed=1, scale=0.05) if with_bias else None
    w, ids = lo.moe_route(logits, k, score, renormalize, bias)
    lr = logits.detach().float().requires_grad_()
    wr, idr = lo.moe_route_reference(lr, k, score, renormalize, bias)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32 and w.shape == ids.shape == (T, k)
    assert torch.equal(ids.cpu(), idr.cpu()), "expert ids differ from the reference"
    assert_close(w, wr, atol=2e-6, rtol=2e-5, name="topk_weights")
    dw = make((T, k), torch.float32, device, seed=3)
    (dl,) = torch.autograd.grad(w, logits, dw)
    (dlr,) = torch.autograd.grad(wr, lr, dw)
    assert dl.dtype == dtype
    if dtype == torch.float32:
        assert_close(dl, dlr, atol=1e-6, rtol=1e-5, name="dlogits")
    else:  # the gradient is computed in fp32 and rounded once: within an ulp of the fp32 value
        assert_close(dl, dlr, rtol=torch.finfo(dtype).eps, atol=1e-6, name="dlogits")


@pytest.mark.parametrize("device", DEVICES)
def test_route_bias_selects_but_does_not_weight(device):
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]], device=device)
    bias = torch.tensor([0.0, 0.0, 0.0, 10.0], device=device)
    w, ids = lo.moe_route(logits, 2, "sigmoid", False, bias)
    assert ids.tolist() == [[3, 0]]
    assert_close(w, torch.sigmoid(logits)[:, [3, 0]], name="weights from unbiased scores")
    w2, ids2 = lo.moe_route(logits, 2, "softmax", True, None)
    assert ids2.tolist() == [[0, 1]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_route_ties_and_nan(device, dtype):
    logits = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.5], [0.0] * 5, [float("nan")] * 5, [1.0, float("-inf"), 3, 3, 0]],
                          dtype=dtype, device=device)
    w, ids = lo.moe_route(logits, 3, "softmax", True)
    assert ids.tolist() == [[1, 2, 3], [0, 1, 2], [0, 1, 2], [2, 3, 0]]
    assert torch.equal(ids, lo.moe_route_reference(logits, 3)[1])
    assert torch.isnan(w[2]).all() and torch.isfinite(w[[0, 1, 3]]).all()


# ---------------------------------------------------------------- dispatch
DISPATCH_CASES = [(1, 4, 1), (7, 4, 2), (127, 8, 2), (300, 64, 8), (1025, 16, 1), (2, 4, 4), (40000, 8, 2)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T,E,k", DISPATCH_CASES)
def test_dispatch_exact(device, T, E, k):
    H = 24
    x = make((T, H), torch.float32, device, seed=T)
    ids = _ids(T, E, k, device, seed=T, skew=0.3)  # skewed: the last experts often get no token
    xp, counts, offsets, row_map = lo.moe_dispatch(x, ids, E)
    xr, cr, orr, rmr = lo.moe_dispatch_reference(x, ids, E)
    assert counts.dtype == offsets.dtype == row_map.dtype == torch.int32
    assert torch.equal(counts, cr) and torch.equal(offsets, orr) and torch.equal(row_map, rmr)
    assert torch.equal(xp, xr)
    assert int(offsets[-1]) == T * k and int(counts.sum()) == T * k
    # stable: inside each expert the rows follow token order
    rm, fl = row_map.reshape(-1).long().cpu(), ids.reshape(-1).long().cpu()
    assert torch.equal(torch.sort(rm).values, torch.arange(T * k)), "row_map must be a permutation"
    for e in range(E):
        pos = rm[fl == e]
        assert torch.equal(pos, torch.arange(int(offsets[e]), int(offsets[e + 1]))), f"expert {e} not stable"


@pytest.mark.parametrize("device", DEVICES)
def test_dispatch_zero_token_experts_and_int64_ids(device):
    ids = torch.tensor([[5, 2], [2, 5], [5, 0]], device=device)  # int64; experts 1, 3, 4, 6, 7 empty
    x = make((3, 8), torch.float32, device)
    xp, counts, offsets, row_map = lo.moe_dispatch(x, ids, 8)
    assert counts.tolist() == [1, 0, 2, 0, 0, 3, 0, 0]
    assert offsets.tolist() == [0, 1, 1, 3, 3, 3, 6, 6, 6]
    assert row_map.tolist() == [[3, 1], [2, 4], [5, 0]]
    assert torch.equal(xp, x[[2, 0, 1, 0, 1, 2]])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dispatch_backward_and_dtypes(device, dtype):
    T, E, k, H = 127, 8, 2, 72
    x = make((T, H), dtype, device, requires_grad=True)
    ids = _ids(T, E, k, device)
    xp, *_ = lo.moe_dispatch(x, ids, E)
    assert xp.dtype == dtype and torch.equal(xp, lo.moe_dispatch_reference(x.detach(), ids, E)[0])
    g = make(xp.shape, dtype, device, seed=5)
    (dx,) = torch.autograd.grad(xp, x, g)
    xr = x.detach().float().requires_grad_()
    (dxr,) = torch.autograd.grad(lo.moe_dispatch_reference(xr, ids, E)[0], xr, g.float())
    xb = x.detach().clone().requires_grad_()
    (dxb,) = torch.autograd.grad(lo.moe_dispatch_reference(xb, ids, E)[0], xb, g)
    assert_close(dx, dxr, dxb, name="dx")


# ---------------------------------------------------------------- combine
def _lowp_combine(yp, w, row_map):
    T, k = row_map.shape
    return (yp[row_map.reshape(-1).long()].view(T, k, yp.shape[1]) * w.to(yp.dtype).unsqueeze(-1)).sum(1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E,k,H", [(1, 4, 1, 8), (7, 4, 2, 33), (127, 8, 2, 640), (33, 64, 8, 127), (1025, 16, 6, 64)])
def test_combine_forward_backward(device, dtype, T, E, k, H):
    ids = _ids(T, E, k, device, seed=H)
    _, _, _, row_map = lo.moe_dispatch(make((T, 1), torch.float32, device), ids, E)
    yp = make((T * k, H), dtype, device, seed=1, requires_grad=True)
    w = torch.rand(T, k, device=device).requires_grad_()
    y = lo.moe_combine(yp, w, row_map, T)
    dy = make((T, H), dtype, device, seed=2)
    dyp, dw = torch.autograd.grad(y, (yp, w), dy)

    ypr = yp.detach().float().requires_grad_()
    wr = w.detach().clone().requires_grad_()
    yr = lo.moe_combine_reference(ypr, wr, row_map, T)
    dypr, dwr = torch.autograd.grad(yr, (ypr, wr), dy.float())
    ypb, wb = yp.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    yb = _lowp_combine(ypb, wb, row_map)
    dypb, dwb = torch.autograd.grad(yb, (ypb, wb), dy)

    assert y.dtype == dtype and dyp.dtype == dtype and dw.dtype == torch.float32
    assert_close(y, yr, yb, name="y")
    assert_close(dyp, dypr, dypb, name="dy_permuted")
    assert_close(dw, dwr, atol=1e-4 * H ** 0.5, rtol=1e-4 if dtype == torch.float32 else 1e-2, name="dweights")


@pytest.mark.parametrize("device", DEVICES)
def test_combine_is_deterministic_and_roundtrips(device):
    T, E, k, H = 1025, 16, 8, 96
    x = make((T, H), torch.float32, device)
    ids = _ids(T, E, k, device)
    xp, _, _, row_map = lo.moe_dispatch(x, ids, E)
    w = torch.rand(T, k, device=device)
    y1, y2 = lo.moe_combine(xp, w, row_map, T), lo.moe_combine(xp, w, row_map, T)
    assert torch.equal(y1, y2)
    assert_close(lo.moe_combine(xp, w / w.sum(-1, keepdim=True), row_map, T), x, atol=1e-5)  # weights sum to 1


def test_combine_accepts_16bit_weights_by_casting():
    T, k, H = 5, 2, 16
    row_map = torch.arange(T * k, dtype=torch.int32).view(T, k)
    yp = make((T * k, H), torch.bfloat16, "cpu")
    w = torch.rand(T, k)
    assert torch.equal(lo.moe_combine(yp, w.bfloat16(), row_map, T), lo.moe_combine(yp, w.bfloat16().float(), row_map, T))


# ---------------------------------------------------------------- shapes, strides, errors, empties
@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs(device):
    T, E, k = 33, 8, 2
    big = make((T, 3 * E), torch.float32, device)
    logits = big[:, E:2 * E]  # row stride 3E, unit column stride: read in place
    assert torch.equal(lo.moe_route(logits, k)[1], lo.moe_route_reference(logits, k)[1])
    lt = make((E, T), torch.float32, device).t()  # column stride != 1: copied
    assert torch.equal(lo.moe_route(lt, k)[1], lo.moe_route_reference(lt, k)[1])
    xbig = make((T, 80), torch.bfloat16, device)
    x = xbig[:, 8:72]
    ids = _ids(T, E, k, device)
    assert torch.equal(lo.moe_dispatch(x, ids, E)[0], lo.moe_dispatch_reference(x, ids, E)[0])
    xt = make((64, T), torch.float32, device).t()
    assert torch.equal(lo.moe_dispatch(xt, ids, E)[0], lo.moe_dispatch_reference(xt, ids, E)[0])
    ids_t = ids.t().contiguous().t()  # non-contiguous ids
    assert torch.equal(lo.moe_dispatch(x, ids_t, E)[3], lo.moe_dispatch_reference(x, ids, E)[3])


@pytest.mark.parametrize("device", DEVICES)
def test_empty_tokens(device):
    E, k, H = 8, 2, 16
    w, ids = lo.moe_route(torch.empty(0, E, device=device), k)
    assert w.shape == ids.shape == (0, k)
    xp, counts, offsets, row_map = lo.moe_dispatch(torch.empty(0, H, device=device), ids, E)
    assert xp.shape == (0, H) and counts.tolist() == [0] * E and offsets.tolist() == [0] * (E + 1)
    assert row_map.shape == (0, k)
    assert lo.moe_combine(xp, w, row_map, 0).shape == (0, H)


def test_bad_input_errors():
    logits = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="'top_k' must be in"):
        lo.moe_route(logits, 9)
    with pytest.raises(RuntimeError, match="'top_k' must be in"):
        torch.ops.llmcore.moe_route_fwd(logits, 0, "softmax", True, None)
    with pytest.raises(ValueError, match="score must be one of"):
        lo.moe_route(logits, 2, "relu")
    with pytest.raises(RuntimeError, match="'score' must be"):
        torch.ops.llmcore.moe_route_fwd(logits, 2, "relu", True, None)
    with pytest.raises(RuntimeError, match="'bias' must have shape"):
        lo.moe_route(logits, 2, bias=torch.zeros(7))
    with pytest.raises(RuntimeError, match="'router_logits' must be 2-D"):
        lo.moe_route(torch.randn(2, 4, 8), 2)
    with pytest.raises(RuntimeError, match="'router_logits' must be float32"):
        lo.moe_route(logits.int(), 2)
    x, ids = torch.randn(4, 16), torch.randint(0, 8, (4, 2), dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"'topk_ids' must hold expert ids in \[0, num_experts=8\)"):
        bad = ids.clone()
        bad[1, 1] = 8  # one id just past the last expert
        lo.moe_dispatch(x, bad, 8)
    with pytest.raises(RuntimeError, match="'topk_ids' must hold expert ids"):
        lo.moe_dispatch(x, ids - 8, 8)
    with pytest.raises(RuntimeError, match="'topk_ids' must have one row per token"):
        lo.moe_dispatch(x, ids[:3], 8)
    with pytest.raises(RuntimeError, match="'topk_ids' must be int32 or int64"):
        lo.moe_dispatch(x, ids.float(), 8)
    with pytest.raises(RuntimeError, match="'num_experts' must be >= 1"):
        lo.moe_dispatch(x, ids, 0)
    with pytest.raises(RuntimeError, match="'x' must be 2-D"):
        lo.moe_dispatch(x.view(2, 2, 16), ids, 8)
    row_map = torch.arange(8, dtype=torch.int32).view(4, 2)
    yp = torch.randn(8, 16)
    with pytest.raises(RuntimeError, match="'y_permuted' must have T \\* k = 8 rows"):
        lo.moe_combine(yp[:7], torch.rand(4, 2), row_map, 4)
    with pytest.raises(RuntimeError, match="'num_tokens' must equal"):
        lo.moe_combine(yp, torch.rand(4, 2), row_map, 5)
    with pytest.raises(RuntimeError, match="'topk_weights' must have shape"):
        lo.moe_combine(yp, torch.rand(4, 3), row_map, 4)
    with pytest.raises(RuntimeError, match="'topk_weights' must be Float"):
        torch.ops.llmcore.moe_combine_fwd(yp, torch.rand(4, 2).double(), row_map, 4)
    with pytest.raises(RuntimeError, match="'row_map' must be int32"):
        lo.moe_combine(yp, torch.rand(4, 2), row_map.long(), 4)


ROW_MAP_MSG = r"moe_combine: argument 'row_map' must hold rows in \[0, T \* k = 8\) \(or -1"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [8, 9, 10 ** 6, 2 ** 31 - 1, -2, -(2 ** 31)])
def test_combine_rejects_row_map_out_of_range(device, bad):
    """An out-of-range row_map entry is an error naming the argument, in every op that takes one
    (forward, backward, and dispatch's backward, which is the same gather); never a read out of
    bounds (10**6 segfaulted, T*k read whatever followed y_permuted)."""
    T, k, H = 4, 2, 16
    row_map = torch.arange(T * k, dtype=torch.int32).view(T, k).to(device)
    row_map[2, 1] = bad
    yp = make((T * k, H), torch.float32, device)
    w = torch.rand(T, k, device=device)
    with pytest.raises(RuntimeError, match=ROW_MAP_MSG):
        lo.moe_combine(yp, w, row_map, T)
    with pytest.raises(RuntimeError, match=ROW_MAP_MSG):
        lo.moe_combine(yp, None, row_map, T)
    with pytest.raises(RuntimeError, match=ROW_MAP_MSG.replace("moe_combine", "moe_combine_bwd")):
        torch.ops.llmcore.moe_combine_bwd(make((T, H), torch.float32, device), yp, w, row_map)
    with pytest.raises(RuntimeError, match=f"got row_map\\[2, 1\\] = {bad}"):
        lo.moe_combine(yp, w, row_map, T)


@pytest.mark.parametrize("device", DEVICES)
def test_int64_ids_are_not_wrapped_into_range(device):
    """int64 topk_ids are narrowed to int32 by saturation: 2**32 + 1 must not become expert 1."""
    x = make((4, 8), torch.float32, device)
    ids = torch.tensor([[0, 1], [2, 2 ** 32 + 1], [3, 0], [1, 2]], device=device)
    if device == "cpu":
        with pytest.raises(RuntimeError, match=r"'topk_ids' must hold expert ids in \[0, num_experts=4\)"):
            lo.moe_dispatch(x, ids, 4)
    else:  # CUDA drops out-of-range ids (no host sync in dispatch): the slot is -1, not expert 1
        _, counts, _, row_map = lo.moe_dispatch(x, ids, 4)
        assert int(row_map[1, 1]) == -1 and int(counts.sum()) == 7
    logits = make((4, 4), torch.float32, device)
    with pytest.raises(RuntimeError, match="moe_route_bwd: argument 'topk_ids' must hold expert ids"):
        torch.ops.llmcore.moe_route_bwd(torch.rand(4, 2, device=device), logits, ids, "softmax", True)


@pytest.mark.parametrize("device", DEVICES)
def test_combine_dropped_slots_read_as_zero(device):
    """-1 (a slot CUDA's moe_dispatch dropped for an out-of-range expert id) contributes nothing,
    in the kernel and in the reference alike."""
    T, k, H = 3, 2, 8
    row_map = torch.tensor([[0, -1], [2, 3], [-1, -1]], dtype=torch.int32, device=device)
    yp = make((T * k, H), torch.float32, device, requires_grad=True)
    w = torch.rand(T, k, device=device, requires_grad=True)
    y = lo.moe_combine(yp, w, row_map, T)
    yr = lo.moe_combine_reference(yp, w, row_map, T)
    assert_close(y, yr, name="y")
    assert_close(y[0], w[0, 0] * yp[0], name="y[0]")
    assert torch.equal(y[2], torch.zeros(H, device=device))
    dy = make((T, H), torch.float32, device, seed=4)
    dyp, dw = torch.autograd.grad(y, (yp, w), dy)
    dypr, dwr = torch.autograd.grad(yr, (yp, w), dy)
    assert_close(dw, dwr, name="dweights")
    used = torch.tensor([0, 2, 3], device=device)
    assert_close(dyp[used], dypr[used], name="dy_permuted (rows in use)")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [8, 10 ** 6, -1])
def test_route_bwd_rejects_topk_ids_out_of_range(device, bad):
    """moe_route_bwd indexes the scores by topk_ids: an id outside [0, E) is an error, never an
    out-of-bounds read or write."""
    logits = make((4, 8), torch.float32, device)
    ids = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]], dtype=torch.int32, device=device)
    ids[1, 0] = bad
    with pytest.raises(RuntimeError, match=r"moe_route_bwd: argument 'topk_ids' must hold expert ids in \[0, num_experts=8\)"):
        torch.ops.llmcore.moe_route_bwd(torch.rand(4, 2, device=device), logits, ids, "softmax", True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_mix_and_expert_limit_errors():
    with pytest.raises(RuntimeError, match="same device"):
        lo.moe_dispatch(torch.randn(4, 8, device="cuda"), torch.zeros(4, 2, dtype=torch.int32), 4)
    with pytest.raises(RuntimeError, match="at most 1024 experts"):
        lo.moe_route(torch.randn(4, 2048, device="cuda"), 2)


# ---------------------------------------------------------------- opcheck, gradcheck, hypothesis, compile
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(device, dtype):
    T, E, k, H = 9, 8, 2, 24
    logits = make((T, E), dtype, device, requires_grad=True)
    bias = make((E,), torch.float32, device, scale=0.1)
    w, ids = torch.ops.llmcore.moe_route_fwd(logits, k, "softmax", True, bias)
    x = make((T, H), dtype, device, requires_grad=True)
    xp, _, _, row_map = torch.ops.llmcore.moe_dispatch_fwd(x, ids, E)
    ops = torch.ops.llmcore
    torch.library.opcheck(ops.moe_route_fwd.default, (logits, k, "softmax", True, bias))
    torch.library.opcheck(ops.moe_route_fwd.default, (logits, k, "sigmoid", False, None))
    torch.library.opcheck(ops.moe_route_bwd.default, (torch.rand(T, k, device=device), logits.detach(), ids, "sigmoid", True))
    torch.library.opcheck(ops.moe_dispatch_fwd.default, (x, ids, E))
    yp = make((T * k, H), dtype, device, requires_grad=True)
    wr = torch.rand(T, k, device=device, requires_grad=True)
    torch.library.opcheck(ops.moe_combine_fwd.default, (yp, wr, row_map, T))
    torch.library.opcheck(ops.moe_combine_fwd.default, (yp, None, row_map, T))
    torch.library.opcheck(ops.moe_combine_bwd.default, (make((T, H), dtype, device), yp.detach(), wr.detach(), row_map))


@pytest.mark.parametrize("score,renormalize", [("softmax", True), ("softmax", False), ("sigmoid", True), ("sigmoid", False)])
def test_gradcheck_float64(score, renormalize):
    T, E, k, H = 6, 8, 3, 5
    logits = make((T, E), torch.float64, "cpu", requires_grad=True)
    bias = make((E,), torch.float64, "cpu", scale=0.1)
    assert torch.autograd.gradcheck(lambda l: lo.moe_route(l, k, score, renormalize, bias)[0], (logits,))
    ids = lo.moe_route(logits, k, score, renormalize, bias)[1]
    x = make((T, H), torch.float64, "cpu", requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: lo.moe_dispatch(a, ids, E)[0], (x,))
    row_map = lo.moe_dispatch(x, ids, E)[3]
    yp = make((T * k, H), torch.float64, "cpu", requires_grad=True)
    w = torch.rand(T, k, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: lo.moe_combine(a, b, row_map, T), (yp, w))

    def pipeline(l, a):  # route -> dispatch -> (row-wise op) -> combine, end to end
        w, i = lo.moe_route(l, k, score, renormalize, bias)
        xp, _, _, rm = lo.moe_dispatch(a, i, E)
        return lo.moe_combine(torch.tanh(xp), w, rm, T)

    assert torch.autograd.gradcheck(pipeline, (logits, x))


@settings(max_examples=30, deadline=None)
@given(T=st.integers(0, 70), E=st.integers(1, 40), kk=st.integers(1, 8), H=st.integers(1, 40),
       dt=st.sampled_from(DTYPES), score=st.sampled_from(["softmax", "sigmoid"]))
def test_hypothesis_shapes(T, E, kk, H, dt, score):
    k = min(kk, E)
    logits = make((T, E), dt, "cpu", seed=T * 31 + E)
    w, ids = lo.moe_route(logits, k, score)
    wr, idr = lo.moe_route_reference(logits, k, score)
    assert torch.equal(ids, idr)
    assert_close(w, wr, atol=2e-6, rtol=2e-5)
    x = make((T, H), dt, "cpu")
    got, ref = lo.moe_dispatch(x, ids, E), lo.moe_dispatch_reference(x, ids, E)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    yp = make((T * k, H), dt, "cpu", seed=7)
    assert_close(lo.moe_combine(yp, w, got[3], T), lo.moe_combine_reference(yp.float(), w, got[3], T),
                 _lowp_combine(yp, w, got[3]))


def test_torch_compile_fullgraph():
    T, E, k, H = 16, 8, 2, 32

    def f(logits, x, bias):
        w, ids = lo.moe_route(logits, k, "softmax", True, bias)
        xp, counts, offsets, row_map = lo.moe_dispatch(x, ids, E)
        return lo.moe_combine(xp * 2, w, row_map, T), counts

    logits = make((T, E), torch.float32, "cpu", requires_grad=True)
    x = make((T, H), torch.float32, "cpu", requires_grad=True)
    bias = make((E,), torch.float32, "cpu", scale=0.1)
    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    (y, c), (yr, cr) = compiled(logits, x, bias), f(logits, x, bias)
    assert_close(y, yr.detach())
    assert torch.equal(c, cr)
    g = torch.autograd.grad(y.square().sum(), (logits, x))
    gr = torch.autograd.grad(yr.square().sum(), (logits, x))
    for a, b in zip(g, gr):
        assert_close(a, b)


def test_reference_backend_switch():
    logits, x = make((5, 4), torch.float32, "cpu"), make((5, 8), torch.float32, "cpu")
    lo.set_backend("reference")
    try:
        w, ids = lo.moe_route(logits, 2)
        assert torch.equal(ids, lo.moe_route_reference(logits, 2)[1])
        xp, _, _, rm = lo.moe_dispatch(x, ids, 4)
        assert torch.equal(xp, lo.moe_dispatch_reference(x, ids, 4)[0])
        assert torch.equal(lo.moe_combine(xp, w, rm, 5), lo.moe_combine_reference(xp, w, rm, 5))
    finally:
        lo.set_backend("llmcore")


# ---------------------------------------------------------------- load balancing
def test_aux_loss_matches_hand_computation():
    # 4 tokens, 2 experts, top-1: experts [0, 0, 0, 1]
    logits = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 3.0]], requires_grad=True)
    ids = torch.tensor([[0], [0], [0], [1]], dtype=torch.int32)
    p = torch.softmax(logits.detach(), -1)
    f = torch.tensor([3 / 4, 1 / 4])
    P = p.mean(0)
    expected = 2 * (f * P).sum()
    loss = lo.moe_aux_loss(logits, ids)
    assert_close(loss, expected)
    # gradient: d/dlogits of E * sum_i f_i * mean_t p_ti
    (g,) = torch.autograd.grad(loss, logits)
    lr = logits.detach().clone().requires_grad_()
    (gr,) = torch.autograd.grad(2 * (f * torch.softmax(lr, -1).mean(0)).sum(), lr)
    assert_close(g, gr)
    # sequence-level: two sequences of 2 tokens, averaged
    fs = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    Ps = p.view(2, 2, 2).mean(1)
    assert_close(lo.moe_aux_loss(logits, ids, seq_len=2), (2 * (fs * Ps).sum(-1)).mean())
    # perfectly balanced routing with uniform probabilities -> exactly 1
    assert_close(lo.moe_aux_loss(torch.zeros(4, 2), torch.tensor([[0], [1], [0], [1]])), torch.tensor(1.0))
    # sigmoid: P uses per-token normalized scores
    s = torch.sigmoid(logits.detach())
    s = s / s.sum(-1, keepdim=True)
    assert_close(lo.moe_aux_loss(logits, ids, score="sigmoid"), 2 * (f * s.mean(0)).sum())
    with pytest.raises(ValueError, match="seq_len must divide"):
        lo.moe_aux_loss(logits, ids, seq_len=3)


def test_bias_update_moves_load_toward_balance():
    torch.manual_seed(0)
    T, E, k = 4096, 8, 2
    # a skewed router: expert e's logits shifted by -0.4 e, so low ids are overloaded
    logits = torch.randn(T, E) * 0.5 - 0.4 * torch.arange(E, dtype=torch.float32)
    bias = torch.zeros(E)

    def imbalance():
        _, ids = lo.moe_route(logits, k, "sigmoid", True, bias)
        load = torch.bincount(ids.reshape(-1).long(), minlength=E).float()
        return (load.max() / load.mean()).item(), lo.moe_dispatch(torch.zeros(T, 1), ids, E)[1]

    start, load = imbalance()
    for _ in range(300):
        lo.moe_bias_update_(bias, load, 1e-3)
        cur, load = imbalance()
    assert start > 2.0, "the router should start skewed"
    assert cur < 1.25 and cur < start / 2, f"max/mean load {start:.2f} -> {cur:.2f}"
    assert bias[0] < 0 < bias[-1], "overloaded experts get a negative bias, underloaded ones a positive"
    b = torch.zeros(3)
    lo.moe_bias_update_(b, torch.tensor([1, 2, 6], dtype=torch.int32), 0.5)
    assert b.tolist() == [0.5, 0.5, -0.5]


# ---------------------------------------------------------------- the oracles themselves
@pytest.mark.parametrize("score,renormalize,with_bias", [("softmax", True, False), ("softmax", False, True),
                                                         ("sigmoid", True, True), ("sigmoid", False, False)])
def test_reference_matches_independent_fp64(score, renormalize, with_bias):
    """The moe references (the kernels' oracles) against independent float64 code: route by
    torch.topk of the biased scores (random logits: no ties), weights from the unbiased scores;
    dispatch and combine as plain Python loops over experts and slots."""
    T, E, k, H = 37, 8, 3, 5
    logits = make((T, E), torch.float64, "cpu", seed=31, scale=2.0, requires_grad=True)
    bias = make((E,), torch.float64, "cpu", seed=32, scale=0.3) if with_bias else None
    w, ids = lo.moe_route_reference(logits, k, score, renormalize, bias)
    s = torch.softmax(logits, -1) if score == "softmax" else 1 / (1 + torch.exp(-logits))
    ids_i = torch.topk(s + (bias if with_bias else 0), k, dim=-1).indices
    w_i = s.gather(-1, ids_i)
    if renormalize:
        w_i = w_i / (w_i.sum(-1, keepdim=True) + 1e-20)
    assert torch.equal(ids.long(), ids_i)
    assert_close(w, w_i, name="topk_weights")
    dw = make((T, k), torch.float64, "cpu", seed=33)
    assert_close(torch.autograd.grad(w, logits, dw)[0], torch.autograd.grad(w_i, logits, dw)[0], name="dlogits")

    x = make((T, H), torch.float64, "cpu", seed=34)
    xp, counts, offsets, row_map = lo.moe_dispatch_reference(x, ids, E)
    pos, row_map_i, xp_i = 0, torch.empty(T, k, dtype=torch.long), torch.empty(T * k, H, dtype=torch.float64)
    for e in range(E):  # expert-major, token order inside an expert
        for t in range(T):
            for j in range(k):
                if int(ids[t, j]) == e:
                    row_map_i[t, j], xp_i[pos] = pos, x[t]
                    pos += 1
    assert torch.equal(row_map.long(), row_map_i) and torch.equal(xp, xp_i)
    assert counts.tolist() == [int((ids == e).sum()) for e in range(E)]
    assert offsets.tolist() == [0] + torch.tensor(counts.tolist()).cumsum(0).tolist()
    yp = make((T * k, H), torch.float64, "cpu", seed=35)
    y = lo.moe_combine_reference(yp, w.detach(), row_map, T)
    y_i = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            y_i[t] += w.detach()[t, j] * yp[int(row_map_i[t, j])]
    assert_close(y, y_i, name="combine")
