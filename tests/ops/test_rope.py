"""rope / rope_ / rope_cache against the fp32 reference, HF transformers, and their contracts."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llmcore.ops as lo
from tests.conftest import CUDA_OK, DEVICES, DTYPES, assert_close, make

# (B, S, Hq, Hkv, D): GQA, MQA, MHA, odd S, D in {8, 64, 96, 128} and a D/2 that is not a multiple of 4
SHAPES = [(2, 7, 4, 2, 64), (1, 1, 8, 8, 128), (3, 5, 6, 1, 96), (1, 127, 2, 2, 8), (2, 3, 3, 1, 18)]
MAX_SEQ = 160


def _positions(form, B, S, device):
    if form == "none":
        return None
    if form == "offset":
        return 9
    if form == "packed":  # two documents per row, positions restart at 0; int32 on purpose
        cut = max(1, S // 2)
        row = torch.cat([torch.arange(cut), torch.arange(S - cut)]).to(torch.int32)
        return torch.stack([row + b for b in range(B)]).to(device)
    if form == "shared":  # (1, S) broadcast over B, int64
        return (torch.arange(S) * 3 % MAX_SEQ)[None].to(device)
    raise AssertionError(form)


def _torch_lowp_rope(q, k, cos, sin, positions=None, interleaved=False):
    """The same math as the reference but in q's own dtype: the low-precision baseline."""
    S = q.shape[1]
    if positions is None or not isinstance(positions, torch.Tensor):
        pos = (torch.arange(S, device=q.device) + (positions or 0))[None]
    else:
        pos = positions.long()
    c, s = cos[pos].to(q.dtype)[:, :, None], sin[pos].to(q.dtype)[:, :, None]

    def rot(x):
        h = x.shape[-1] // 2
        x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., :h], x[..., h:])
        y1, y2 = x1 * c - x2 * s, x2 * c + x1 * s
        return torch.stack((y1, y2), -1).flatten(-2) if interleaved else torch.cat((y1, y2), -1)

    return rot(q), rot(k)


def _check_fwd_bwd(q, k, cos, sin, positions, interleaved, fn=lo.rope):
    dtype, device = q.dtype, q.device
    qo, ko = fn(q, k, cos, sin, positions=positions, interleaved=interleaved)
    dqo, dko = make(qo.shape, dtype, device), make(ko.shape, dtype, device)
    dq, dk = torch.autograd.grad((qo, ko), (q, k), (dqo, dko))

    qr, kr = q.detach().float().requires_grad_(), k.detach().float().requires_grad_()
    qor, kor = lo.rope_reference(qr, kr, cos, sin, positions, interleaved)
    dqr, dkr = torch.autograd.grad((qor, kor), (qr, kr), (dqo.float(), dko.float()))
    qb, kb = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    qob, kob = _torch_lowp_rope(qb, kb, cos, sin, positions, interleaved)
    dqb, dkb = torch.autograd.grad((qob, kob), (qb, kb), (dqo, dko))

    assert qo.dtype == dtype and ko.dtype == dtype and qo.is_contiguous() and ko.is_contiguous()
    assert_close(qo, qor, qob, name="q_out")
    assert_close(ko, kor, kob, name="k_out")
    assert_close(dq, dqr, dqb, name="dq")
    assert_close(dk, dkr, dkb, name="dk")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("pos_form", ["none", "offset", "packed", "shared"])
@pytest.mark.parametrize("shape", SHAPES)
def test_rope_forward_backward(device, dtype, interleaved, pos_form, shape):
    B, S, Hq, Hk, D = shape
    cos, sin = lo.rope_cache(MAX_SEQ, D, theta=1e4, device=device)
    q = make((B, S, Hq, D), dtype, device, requires_grad=True)
    k = make((B, S, Hk, D), dtype, device, requires_grad=True)
    _check_fwd_bwd(q, k, cos, sin, _positions(pos_form, B, S, device), interleaved)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_strided_qkv_views(device, dtype, interleaved):
    """q and k sliced out of one fused qkv projection (B, S, (Hq + 2 Hkv) * D): strided in S and
    in B, read in place; and a (B, H, S, D) tensor transposed to (B, S, H, D)."""
    B, S, Hq, Hk, D = 2, 11, 4, 2, 64
    cos, sin = lo.rope_cache(64, D, device=device)
    qkv = make((B, S, (Hq + 2 * Hk) * D), dtype, device, requires_grad=True)
    q = qkv[..., : Hq * D].view(B, S, Hq, D)
    k = qkv[..., Hq * D: (Hq + Hk) * D].view(B, S, Hk, D)
    assert not q.is_contiguous() and not k.is_contiguous()
    _check_fwd_bwd(q, k, cos, sin, 3, interleaved)
    qt = make((B, Hq, S, D), dtype, device, requires_grad=True).transpose(1, 2)  # stride(1) = D
    kt = make((B, Hk, S, D), dtype, device, requires_grad=True).transpose(1, 2)
    _check_fwd_bwd(qt, kt, cos, sin, None, interleaved)
    # odd element offsets / strides (not 16-byte aligned): the scalar path
    base = make((B, S, Hq * D + 1), dtype, device, requires_grad=True)
    qo = base[..., 1:].view(B, S, Hq, D)
    _check_fwd_bwd(qo, make((B, S, Hk, D), dtype, device, requires_grad=True), cos, sin, None, interleaved)


@pytest.mark.parametrize("device", DEVICES)
def test_rope_strided_last_dim_is_copied(device):
    cos, sin = lo.rope_cache(16, 32, device=device)
    q = make((2, 5, 3, 64), torch.float32, device)[..., ::2]
    k = make((2, 5, 1, 32), torch.float32, device)
    for a, b in zip(lo.rope(q, k, cos, sin), lo.rope_reference(q, k, cos, sin)):
        assert_close(a, b)
    with pytest.raises(RuntimeError, match="'q' must have unit stride"):
        lo.rope_(q, k, cos, sin)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_inplace_on_fused_qkv(device, dtype, interleaved):
    B, S, Hq, Hk, D = 2, 6, 4, 2, 64
    cos, sin = lo.rope_cache(32, D, device=device)
    qkv = make((B, S, (Hq + 2 * Hk) * D), dtype, device)
    before = qkv.clone()
    q = qkv[..., : Hq * D].view(B, S, Hq, D)
    k = qkv[..., Hq * D: (Hq + Hk) * D].view(B, S, Hk, D)
    pos = torch.tensor([[5, 6, 7, 0, 1, 2]] * B, device=device)
    expect_q, expect_k = lo.rope(q.clone(), k.clone(), cos, sin, positions=pos, interleaved=interleaved)
    rq, rk = lo.rope_(q, k, cos, sin, positions=pos, interleaved=interleaved)
    assert rq is q and rk is k
    assert torch.equal(q, expect_q) and torch.equal(k, expect_k)
    assert torch.equal(qkv[..., (Hq + Hk) * D:], before[..., (Hq + Hk) * D:]), "v must be untouched"


def test_rope_inplace_errors():
    cos, sin = lo.rope_cache(8, 16)
    q, k = torch.randn(1, 4, 2, 16, requires_grad=True), torch.randn(1, 4, 1, 16)
    with pytest.raises(RuntimeError, match="inference only"):
        lo.rope_(q, k, cos, sin)
    with torch.no_grad():
        lo.rope_(q, k, cos, sin)  # allowed without grad mode
    x = torch.randn(1, 4, 2, 16)
    with pytest.raises(RuntimeError, match="overlap in memory"):
        lo.rope_(x, x, cos, sin)
    with pytest.raises(RuntimeError, match="internal memory overlap"):
        lo.rope_(torch.randn(1, 1, 2, 16).expand(3, 4, 2, 16), torch.randn(3, 4, 1, 16), cos, sin)


def _rotate_half_verbatim(x):
    """HF transformers' rotate_half (modeling_llama.py), verbatim: the fallback when transformers
    cannot be imported."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _apply_rotary_pos_emb_verbatim(q, k, cos, sin, unsqueeze_dim=1):
    """HF transformers' apply_rotary_pos_emb (modeling_llama.py), verbatim."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (_rotate_half_verbatim(q) * sin)
    k_embed = (k * cos) + (_rotate_half_verbatim(k) * sin)
    return q_embed, k_embed


def _hf_rope_parts(Hq, Hk, D, theta, max_pos):
    """(rotary(x, position_ids) -> (cos, sin) of shape (B, S, D) in x's dtype, apply_rotary_pos_emb):
    HF's own LlamaRotaryEmbedding when transformers imports, else HF's default-rope formula."""
    try:
        import transformers
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    except Exception:
        def rotary(x, position_ids):
            inv_freq = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.int64).to(dtype=torch.float) / D))
            freqs = (inv_freq[None, :, None].expand(position_ids.shape[0], -1, 1) @ position_ids[:, None, :].float())
            emb = torch.cat((freqs.transpose(1, 2), freqs.transpose(1, 2)), dim=-1)
            return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

        return rotary, _apply_rotary_pos_emb_verbatim
    config = transformers.LlamaConfig(hidden_size=Hq * D, num_attention_heads=Hq, num_key_value_heads=Hk,
                                      head_dim=D, max_position_embeddings=max_pos, rope_theta=theta)
    return LlamaRotaryEmbedding(config), apply_rotary_pos_emb


def test_hf_apply_rotary_pos_emb_equality():
    """The rotate-half layout equals HF transformers' Llama rotary embedding + apply_rotary_pos_emb."""
    B, S, Hq, Hk, D, theta = 2, 37, 8, 2, 64, 1e6
    rotary, apply_rotary_pos_emb = _hf_rope_parts(Hq, Hk, D, theta, 128)
    position_ids = torch.stack([torch.arange(S), torch.arange(S) + 50])  # (B, S)
    cos_ours, sin_ours = lo.rope_cache(128, D, theta=theta)
    for dtype in (torch.float32, torch.bfloat16):
        q, k = make((B, S, Hq, D), dtype, "cpu"), make((B, S, Hk, D), dtype, "cpu")
        cos_hf, sin_hf = rotary(q, position_ids)  # (B, S, D) in q's dtype
        if dtype == torch.float32:  # the tables themselves: HF's are [freqs | freqs]
            torch.testing.assert_close(cos_hf[..., : D // 2], cos_ours[position_ids], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(sin_hf[..., D // 2:], sin_ours[position_ids], rtol=1e-6, atol=1e-6)
        q_hf, k_hf = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos_hf, sin_hf)  # (B, H, S, D)
        q_hf, k_hf = q_hf.transpose(1, 2), k_hf.transpose(1, 2)
        qo, ko = lo.rope(q, k, cos_ours, sin_ours, positions=position_ids)
        qr, kr = lo.rope_reference(q.float(), k.float(), cos_ours, sin_ours, position_ids)
        if dtype == torch.float32:
            torch.testing.assert_close(qo, q_hf, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ko, k_hf, rtol=1e-5, atol=1e-5)
        else:  # HF computes in bf16: it is the low-precision baseline of the tolerance rule
            assert_close(qo, qr, q_hf, name="q vs HF")
            assert_close(ko, kr, k_hf, name="k vs HF")


def test_hf_fallback_formula_matches_transformers():
    """The verbatim fallback above is HF's formula: checked against transformers when it imports."""
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 1, 5, 16)
    cos, sin = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    for a, b in zip(apply_rotary_pos_emb(q, k, cos, sin), _apply_rotary_pos_emb_verbatim(q, k, cos, sin)):
        assert torch.equal(a, b)


def test_rope_cache_values_and_yarn():
    D, theta = 64, 1e6
    cos, sin = lo.rope_cache(100, D, theta=theta)
    assert cos.shape == sin.shape == (100, D // 2) and cos.dtype == torch.float32
    p, i = 37, 5
    ang = p * theta ** (-2 * i / D)
    assert abs(cos[p, i].item() - math.cos(ang)) < 1e-5 and abs(sin[p, i].item() - math.sin(ang)) < 1e-5
    scaling = {"factor": 16, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1}
    c_short, _ = lo.rope_cache(64, D, theta=theta, scaling=scaling)
    assert torch.equal(c_short, cos[:64]), "YaRN must leave tables within the original length unchanged"
    c_long, s_long = lo.rope_cache(1024, D, theta=theta, scaling=scaling)
    c_tuple, _ = lo.rope_cache(1024, D, theta=theta, scaling=(16, 64))
    assert torch.equal(c_long, c_tuple)
    inv = theta ** (-torch.arange(0, D, 2).double() / D)
    got = torch.atan2(s_long[1].double(), c_long[1].double())  # angle at position 1 = scaled inv_freq
    assert torch.allclose(got[0], inv[0], rtol=1e-5), "highest frequency must be kept"
    assert torch.allclose(got[-1], inv[-1] / 16, rtol=1e-4), "lowest frequency must be divided by factor"
    ratio = (got / inv)[1:-1]
    assert torch.all(ratio[1:] <= ratio[:-1] + 1e-6), "the ramp must interpolate monotonically"
    c_att, _ = lo.rope_cache(1024, D, theta=theta, scaling={**scaling, "attention_factor": 0.5})
    torch.testing.assert_close(c_att, c_long * 0.5)
    with pytest.raises(ValueError, match="even"):
        lo.rope_cache(8, 7)
    with pytest.raises(ValueError, match="YaRN"):
        lo.rope_cache(8, 8, scaling={"type": "linear", "factor": 2})


@pytest.mark.parametrize("device", DEVICES)
def test_rope_empty(device):
    cos, sin = lo.rope_cache(8, 16, device=device)
    for B, S, Hq, Hk in ((0, 4, 2, 1), (2, 0, 2, 1), (2, 3, 2, 0)):
        q, k = torch.empty(B, S, Hq, 16, device=device), torch.empty(B, S, Hk, 16, device=device)
        qo, ko = lo.rope(q, k, cos, sin)
        assert qo.shape == q.shape and ko.shape == k.shape
        lo.rope_(q, k, cos, sin)


def test_rope_bad_input_errors():
    cos, sin = lo.rope_cache(8, 16)
    q, k = torch.randn(2, 4, 4, 16), torch.randn(2, 4, 2, 16)
    cases = [
        (dict(q=q.int()), "'q' must be float32"),
        (dict(k=k.double()), "'q' and 'k' must have the same dtype"),
        (dict(q=q[0]), "'q' must be 4-D"),
        (dict(k=torch.randn(2, 5, 2, 16)), "must agree in B, S and D"),
        (dict(q=torch.randn(2, 4, 4, 15), k=torch.randn(2, 4, 2, 15)), "even, non-zero head_dim"),
        (dict(cos=cos.half()), "'cos' must be float32"),
        (dict(sin=sin[:, :4]), "'sin' must have shape \\(max_seq_len, head_dim/2 = 8\\)"),
        (dict(positions=6), "exceed the cos/sin tables"),
        (dict(positions=-1), "'position_offset' must be >= 0"),
        (dict(positions=torch.full((2, 4), 8)), "'positions' .* must lie in \\[0, max_seq_len = 8\\)"),
        (dict(positions=torch.full((2, 4), -1)), "must lie in"),
        (dict(positions=torch.zeros(2, 4)), "'positions' must be int64 or int32"),
        (dict(positions=torch.zeros(3, 4, dtype=torch.long)), "'positions' must have shape \\(B, S\\)"),
        (dict(positions=torch.zeros(8, dtype=torch.long)), "'positions' must be 2-D"),
    ]
    for kw, msg in cases:
        args = dict(q=q, k=k, cos=cos, sin=sin)
        args.update(kw)
        pos = args.pop("positions", None)
        with pytest.raises(RuntimeError, match=msg):
            lo.rope(args["q"], args["k"], args["cos"], args["sin"], positions=pos)
    with pytest.raises(TypeError, match="positions must be None"):
        lo.rope(q, k, cos, sin, positions=1.5)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_OK, reason="needs CUDA")
def test_rope_cuda_out_of_range_position_gives_nan():
    cos, sin = lo.rope_cache(8, 16, device="cuda")
    q, k = make((1, 3, 2, 16), torch.float32, "cuda"), make((1, 3, 1, 16), torch.float32, "cuda")
    pos = torch.tensor([[0, 99, 2]], device="cuda")
    qo, ko = lo.rope(q, k, cos, sin, positions=pos)
    assert torch.isnan(qo[:, 1]).all() and torch.isnan(ko[:, 1]).all()
    ok = torch.tensor([[0, 0, 2]], device="cuda")
    qr, kr = lo.rope_reference(q, k, cos, sin, ok)
    assert_close(qo[:, [0, 2]], qr[:, [0, 2]])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rope_device_mix_error():
    cos, sin = lo.rope_cache(8, 16)
    with pytest.raises(RuntimeError, match="same device"):
        lo.rope(torch.randn(1, 2, 2, 16, device="cuda"), torch.randn(1, 2, 1, 16, device="cuda"), cos, sin)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_opcheck(device, dtype):
    cos, sin = lo.rope_cache(16, 32, device=device)
    q, k = make((2, 5, 4, 32), dtype, device), make((2, 5, 2, 32), dtype, device)
    pos = torch.randint(0, 16, (2, 5), device=device)
    ops = torch.ops.llmcore
    for positions, offset, inter in ((None, 0, False), (None, 3, True), (pos, 0, False)):
        torch.library.opcheck(ops.rope_fwd.default, (q.clone().requires_grad_(), k.clone().requires_grad_(), cos, sin,
                                                     positions, offset, inter))
        torch.library.opcheck(ops.rope_bwd.default, (q, k, cos, sin, positions, offset, inter))
        torch.library.opcheck(ops.rope_.default, (q.clone(), k.clone(), cos, sin, positions, offset, inter))


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_gradcheck_float64(interleaved):
    cos, sin = lo.rope_cache(16, 8)
    q = make((2, 3, 2, 8), torch.float64, "cpu", requires_grad=True)
    k = make((2, 3, 1, 8), torch.float64, "cpu", requires_grad=True)
    pos = torch.tensor([[3, 1, 0], [7, 8, 9]])
    f = lambda a, b: lo.rope(a, b, cos, sin, positions=pos, interleaved=interleaved)  # noqa: E731
    assert torch.autograd.gradcheck(f, (q, k))
    assert torch.autograd.gradgradcheck(f, (q, k))


@settings(max_examples=25, deadline=None)
@given(B=st.integers(0, 3), S=st.integers(0, 9), Hq=st.integers(1, 5), Hk=st.integers(0, 3),
       half=st.integers(1, 40), inter=st.booleans(), off=st.integers(0, 4), dt=st.sampled_from(DTYPES))
def test_rope_hypothesis_shapes(B, S, Hq, Hk, half, inter, off, dt):
    D = 2 * half
    cos, sin = lo.rope_cache(16, D)
    q, k = make((B, S, Hq, D), dt, "cpu"), make((B, S, Hk, D), dt, "cpu")
    got = lo.rope(q, k, cos, sin, positions=off, interleaved=inter)
    ref = lo.rope_reference(q.float(), k.float(), cos, sin, off, inter)
    base = _torch_lowp_rope(q, k, cos, sin, off, inter)
    for a, r, b in zip(got, ref, base):
        assert_close(a, r, b)


def test_rope_torch_compile_fullgraph():
    cos, sin = lo.rope_cache(32, 16)

    def f(q, k, pos):
        q1, k1 = lo.rope(q, k, cos, sin, positions=pos)
        q2, k2 = lo.rope(q1 * 2, k1, cos, sin, positions=4, interleaved=True)
        return q2.sum(-1) + k2.sum((-1, -2))[..., None]

    q = make((2, 5, 3, 16), torch.float32, "cpu", requires_grad=True)
    k = make((2, 5, 1, 16), torch.float32, "cpu", requires_grad=True)
    pos = torch.tensor([[0, 1, 2, 0, 1], [4, 5, 6, 7, 8]])
    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    out, ref = compiled(q, k, pos), f(q, k, pos)
    assert_close(out, ref.detach())
    for a, b in zip(torch.autograd.grad(out.sum(), (q, k)), torch.autograd.grad(ref.sum(), (q, k))):
        assert_close(a, b)


def test_rope_compiled_decode_does_not_recompile_per_offset():
    """The KV-cache offset is a SymInt in the schema: a compiled decode step with a new offset every
    call compiles at most twice (static, then dynamic), not once per position."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cos, sin = lo.rope_cache(64, 16)
    q, k = make((1, 1, 2, 16), torch.float32, "cpu"), make((1, 1, 1, 16), torch.float32, "cpu")
    step = torch.compile(lambda q, k, off: lo.rope(q, k, cos, sin, positions=off), fullgraph=True)
    for off in range(1, 7):
        for a, b in zip(step(q, k, off), lo.rope_reference(q, k, cos, sin, off)):
            assert_close(a, b)
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])


def test_rope_reference_backend_switch():
    cos, sin = lo.rope_cache(8, 16)
    q, k = make((1, 4, 2, 16), torch.float32, "cpu"), make((1, 4, 1, 16), torch.float32, "cpu")
    lo.set_backend("reference")
    try:
        for a, b in zip(lo.rope(q, k, cos, sin, positions=2), lo.rope_reference(q, k, cos, sin, 2)):
            assert torch.equal(a, b)
    finally:
        lo.set_backend("llmcore")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rope_16bit_conversions_exact(dtype):
    """Every 16-bit value goes through the CPU kernel's widen/narrow exactly: with sin = 0 the fp32
    math is exact up to one product, so the output must equal the fp32 reference rounded by PyTorch
    bit for bit — subnormals, overflow to inf, signed zeros and NaN (inf * sin 0) included."""
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)  # all 65536 bit patterns
    D = 64
    S = x.numel() // D
    q = x.reshape(1, S, 1, D)
    cos = torch.rand(S, D // 2, generator=torch.Generator().manual_seed(0)) * 4
    cos[0] = 1.0  # identity row: a pure widen -> narrow round trip
    sin = torch.zeros_like(cos)
    qo, _ = lo.rope(q, q[:, :, :0], cos, sin)
    expect, _ = lo.rope_reference(q, q[:, :, :0], cos, sin)
    same = (qo.view(torch.int16) == expect.view(torch.int16)) | (torch.isnan(qo) & torch.isnan(expect))
    assert bool(same.all()), f"{int((~same).sum())} values differ"


# ---------------------------------------------------------------- the oracle itself
def _meta_apply_rotary_emb(xq, xk, freqs_cis):
    """Meta Llama's apply_rotary_emb (llama/model.py), verbatim but for the reshape of freqs_cis:
    adjacent pairs as complex numbers times e^{i angle}."""
    xq_ = torch.view_as_complex(xq.reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.reshape(*xk.shape[:-1], -1, 2))
    fc = freqs_cis[:, :, None, :]  # (B|1, S, 1, D/2)
    return torch.view_as_real(xq_ * fc).flatten(3), torch.view_as_real(xk_ * fc).flatten(3)


@pytest.mark.parametrize("pos_form", ["none", "offset", "tensor"])
def test_reference_matches_independent_fp64(pos_form):
    """rope_reference (the kernels' oracle) in float64 against transformers' apply_rotary_pos_emb
    (rotate-half layout) and Meta's complex-number apply_rotary_emb (interleaved layout), forward
    and gradients, on fp64 tables built here from the angles, so kernel and oracle cannot share a bug."""
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    B, S, Hq, Hk, D, theta, max_pos = 2, 37, 4, 2, 32, 1e4, 128
    inv_freq = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    angles = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv_freq)  # (max_pos, D/2)
    cos, sin = angles.cos(), angles.sin()
    if pos_form == "none":
        positions, pos = None, torch.arange(S)[None]
    elif pos_form == "offset":
        positions, pos = 50, (torch.arange(S) + 50)[None]
    else:
        pos = torch.stack([torch.randperm(max_pos, generator=torch.Generator().manual_seed(0))[:S], torch.arange(S)])
        positions = pos
    q = make((B, S, Hq, D), torch.float64, "cpu", seed=1, requires_grad=True)
    k = make((B, S, Hk, D), torch.float64, "cpu", seed=2, requires_grad=True)
    dq, dk = make(q.shape, torch.float64, "cpu", seed=3), make(k.shape, torch.float64, "cpu", seed=4)
    for interleaved in (False, True):
        qr, kr = lo.rope_reference(q, k, cos, sin, positions, interleaved)
        if interleaved:
            qi, ki = _meta_apply_rotary_emb(q, k, torch.polar(torch.ones_like(angles), angles)[pos])
        else:
            emb = torch.cat([angles, angles], -1)[pos]  # HF's (B, S, D) tables: [freqs | freqs]
            qi, ki = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), emb.cos(), emb.sin())
            qi, ki = qi.transpose(1, 2), ki.transpose(1, 2)
        name = "Meta complex" if interleaved else "HF rotate_half"
        assert_close(qr, qi, name=f"q vs {name}")
        assert_close(kr, ki, name=f"k vs {name}")
        ga = torch.autograd.grad((qr, kr), (q, k), (dq, dk))
        gi = torch.autograd.grad((qi, ki), (q, k), (dq, dk))
        for a, b, nm in zip(ga, gi, ("dq", "dk")):
            assert_close(a, b, name=f"{nm} vs {name}")
