"""nf4_quantize / nf4_dequantize: bit-exact against the pure-PyTorch reference (always) and against
bitsandbytes (when installed), first-principles checks of the format, error statistics, bad input."""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llmcore.ops as lo
from llmcore.ops import nf4 as nf4mod
from llmcore.ops.nf4 import NF4_CODE, NF4Weight, dynamic_map_signed
from tests.conftest import DEVICES, DTYPES, ODD_SIZES

SHAPES = [(1,), (7,), (127,), (1025,), (3, 5, 7), (64, 64), (127, 65), (33, 1031)]
BLOCKSIZES = [32, 64, 128, 256]


def _weight(shape, dtype, device, seed=0):
    """Normal values with a per-row scale spread, so the absmax (and double quant) vary."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    if len(shape) > 1:
        w = w * torch.rand((shape[0],) + (1,) * (len(shape) - 1), generator=g).mul(4).add(0.05)
    return w.to(dtype).to(device)


def _fields(nf):
    return [nf.data, nf.absmax] + ([nf.absmax2, nf.code2, nf.offset] if nf.double_quant else [])


def _assert_same_nf4(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype and a.blocksize == b.blocksize
    assert a.double_quant == b.double_quant
    for x, y, name in zip(_fields(a), _fields(b), ["data", "absmax", "absmax2", "code2", "offset"]):
        assert x.dtype == y.dtype, name
        assert torch.equal(x.cpu().reshape(-1), y.cpu().reshape(-1)), f"{name} differs"


# ------------------------------------------------------------------ kernel == reference (bit-exact)

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_dequantize_match_reference(device, dtype, shape, double_quant):
    for bs in BLOCKSIZES:
        w = _weight(shape, dtype, device, seed=bs)
        nf = lo.nf4_quantize(w, bs, double_quant)
        ref = lo.nf4_quantize_reference(w, bs, double_quant)
        _assert_same_nf4(nf, ref)
        for out_dtype in DTYPES:
            d = lo.nf4_dequantize(nf, out_dtype)
            assert d.shape == w.shape and d.dtype == out_dtype and d.device == w.device
            assert torch.equal(d, lo.nf4_dequantize_reference(nf, out_dtype))
        assert lo.nf4_dequantize(nf).dtype == dtype  # default: the original dtype


def test_large_double_quant_matches_reference():
    """Many second-level blocks (nblocks > 256) with a wide spread of scales."""
    w = _weight((1000, 1000), torch.float32, "cpu", seed=3) * torch.logspace(-3, 2, 1000).view(-1, 1)
    nf, ref = lo.nf4_quantize(w, 64, True), lo.nf4_quantize_reference(w, 64, True)
    assert nf.absmax2.numel() == (1000 * 1000 // 64 + 255) // 256
    _assert_same_nf4(nf, ref)
    assert torch.equal(lo.nf4_dequantize(nf), lo.nf4_dequantize_reference(nf))


def test_dequantize_float64_on_cpu():
    nf = lo.nf4_quantize(_weight((33, 70), torch.float32, "cpu"), 64)
    assert torch.equal(lo.nf4_dequantize(nf, torch.float64), lo.nf4_dequantize_reference(nf, torch.float64))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3000), bs=st.sampled_from([32, 64, 128, 256, 512]), dq=st.booleans(),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_hypothesis_sizes(n, bs, dq, dtype, seed):
    w = _weight((n,), dtype, "cpu", seed) * (seed % 7 + 0.01)
    nf = lo.nf4_quantize(w, bs, dq)
    _assert_same_nf4(nf, lo.nf4_quantize_reference(w, bs, dq))
    assert torch.equal(lo.nf4_dequantize(nf, torch.float32), lo.nf4_dequantize_reference(nf, torch.float32))


# ------------------------------------------------------------------ the format from first principles

def test_known_answer():
    """[1, 2]: absmax 2; 0.5 lies below the 12/13 midpoint -> code 12 (0.4407); 1.0 -> code 15.
    High nibble first: 0xCF. An odd third value leaves code 7 (0.0) in the pad nibble."""
    nf = lo.nf4_quantize(torch.tensor([1.0, 2.0]), 64, double_quant=False)
    assert nf.data.tolist() == [0xCF] and nf.absmax.tolist() == [2.0]
    nf = lo.nf4_quantize(torch.tensor([1.0, 2.0, -2.0]), 64, double_quant=False)
    assert nf.data.tolist() == [0xCF, 0x07]
    assert lo.nf4_dequantize(nf).tolist() == [torch.tensor(0.44070982933044434).item() * 2, 2.0, -2.0]


@pytest.mark.parametrize("n", ODD_SIZES + [64, 200])
def test_codes_are_nearest_and_padding(n):
    """Every code is the nearest NF4 value to w / absmax (ties: lower code); absmax = block max."""
    bs = 64
    w = _weight((n,), torch.float32, "cpu", seed=n)
    nf = lo.nf4_quantize(w, bs, double_quant=False)
    code = torch.tensor(NF4_CODE)
    q = torch.stack([nf.data >> 4, nf.data & 15], -1).reshape(-1).long()
    if n % 2:
        assert q[n].item() == 7  # the pad nibble is code 7 (0.0)
    q = q[:n]
    blocks = torch.nn.functional.pad(w, (0, (-n) % bs)).reshape(-1, bs)
    assert torch.equal(nf.absmax, blocks.abs().amax(-1).clamp(min=1e-38))
    x = (w / nf.absmax.repeat_interleave(bs)[:n]).double()
    dist = (x.unsqueeze(-1) - code.double()).abs()
    best = dist.min(-1).values
    assert torch.all(dist.gather(-1, q.unsqueeze(-1)).squeeze(-1) <= best + 1e-6)


def test_double_quant_structure():
    w = _weight((300, 257), torch.float32, "cpu", seed=5)
    plain = lo.nf4_quantize(w, 64, double_quant=False)
    nf = lo.nf4_quantize(w, 64, double_quant=True)
    assert torch.equal(nf.data, plain.data)  # the 4-bit codes do not depend on double quant
    assert nf.absmax.dtype == torch.uint8 and nf.code2.shape == (256,)
    assert torch.equal(nf.code2, dynamic_map_signed())
    assert torch.allclose(nf.offset, plain.absmax.mean())
    nb = plain.absmax.numel()
    x = plain.absmax - nf.offset
    a2 = torch.nn.functional.pad(x, (0, (-nb) % 256)).reshape(-1, 256).abs().amax(-1)
    assert torch.equal(nf.absmax2, a2)
    # each 8-bit code is the nearest one up to the 2/65535 grid bitsandbytes quantizes on
    t = x / a2.repeat_interleave(256)[:nb]
    err = (nf.code2[nf.absmax.long()] - t).abs()
    best = (t.unsqueeze(-1) - nf.code2).abs().min(-1).values
    assert torch.all(err <= best + 2.0 / 65535)
    # storage: 4 + 8/64 + 32/(64*256) bits per weight (+ the 256-entry code)
    bits = (nf.nbytes() - 256 * 4 - 4) * 8 / w.numel()
    assert abs(bits - 4.127) < 0.01


def test_dynamic_map():
    m = dynamic_map_signed()
    assert m.shape == (256,) and torch.all(m[1:] > m[:-1])
    assert m[-1].item() == 1.0 and m[0].item() == pytest.approx(-0.99297, abs=1e-5) and (m == 0).sum() == 1


def test_round_trip_error_statistics():
    """N(0, 1) weights, blocksize 64: relative RMS error ~0.10, unbiased; double quant adds ~nothing."""
    w = torch.randn(512, 1024, generator=torch.Generator().manual_seed(0))
    errs = {}
    for dq in (False, True):
        d = lo.nf4_dequantize(lo.nf4_quantize(w, 64, dq))
        e = d - w
        errs[dq] = (e.norm() / w.norm()).item()
        assert abs(e.mean().item()) < 1e-3
    assert 0.08 < errs[False] < 0.11, errs
    assert errs[True] < errs[False] * 1.01, errs
    # max error per value: half the widest code gap (between -1 and -0.696) times the block's absmax
    code = torch.tensor(NF4_CODE)
    half_gap = ((code[1:] - code[:-1]).max() / 2).item()
    nf = lo.nf4_quantize(w, 64, False)
    e = (lo.nf4_dequantize(nf) - w).abs().reshape(-1, 64)
    assert torch.all(e <= nf.absmax.view(-1, 1) * half_gap * (1 + 1e-5))
    # larger blocks are coarser
    e128 = (lo.nf4_dequantize(lo.nf4_quantize(w, 256, False)) - w).norm() / w.norm()
    assert e128 > errs[False]


@pytest.mark.parametrize("device", DEVICES)
def test_dequantize_dtypes_round_once(device):
    """A 16-bit output equals the fp32 output rounded once (no double rounding)."""
    nf = lo.nf4_quantize(_weight((129, 65), torch.float32, device), 64)
    f32 = lo.nf4_dequantize(nf, torch.float32)
    for dt in (torch.bfloat16, torch.float16):
        assert torch.equal(lo.nf4_dequantize(nf, dt), f32.to(dt))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [1e-7, 3e-5, 1e3, 7e4, 1e6])
def test_dequantize_extreme_scales(device, scale):
    """fp16 subnormal and overflow outputs, bf16/fp32 at the same scales: still one exact rounding."""
    w = _weight((37, 64), torch.float32, device) * scale
    for dq in (False, True):
        nf = lo.nf4_quantize(w, 64, dq)
        for dt in DTYPES:
            assert torch.equal(lo.nf4_dequantize(nf, dt), lo.nf4_dequantize_reference(nf, dt))


@pytest.mark.parametrize("device", DEVICES)
def test_strided_and_offset_inputs(device):
    w = _weight((65, 130), torch.bfloat16, device)
    _assert_same_nf4(lo.nf4_quantize(w.t()), lo.nf4_quantize(w.t().contiguous()))  # logical row-major order
    nf = lo.nf4_quantize(w)
    big = torch.cat([torch.zeros(1, dtype=torch.uint8, device=device), nf.data])
    view = NF4Weight(**{**nf.__dict__, "data": big[1:]})  # packed at an odd byte offset (e.g. from bnb)
    assert torch.equal(lo.nf4_dequantize(view), lo.nf4_dequantize(nf))


def test_zero_and_constant_blocks():
    w = torch.zeros(3, 64)
    w[1] = 5.0
    w[2, 0] = -1.0
    for dq in (False, True):
        nf = lo.nf4_quantize(w, 64, dq)
        _assert_same_nf4(nf, lo.nf4_quantize_reference(w, 64, dq))
        d = lo.nf4_dequantize(nf)
        assert torch.equal(d, lo.nf4_dequantize_reference(nf))
        if not dq:
            assert torch.equal(d, w)  # 0, ±absmax are exact codes
    all_same = lo.nf4_quantize(torch.full((4, 64), 2.0), 64, True)  # absmax - offset == 0 everywhere
    assert torch.equal(all_same.absmax2, torch.zeros(1)) and torch.equal(lo.nf4_dequantize(all_same),
                                                                         torch.full((4, 64), 2.0))


def test_to_device_and_fields():
    nf = lo.nf4_quantize(_weight((10, 64), torch.float16, "cpu"))
    assert nf.numel == 640 and nf.device.type == "cpu" and nf.double_quant
    assert torch.equal(lo.nf4_dequantize(nf.to("cpu")), lo.nf4_dequantize(nf))


# ------------------------------------------------------------------ bad input

def test_bad_inputs():
    w = torch.randn(64)
    with pytest.raises(RuntimeError, match="'blocksize' must be a power of two"):
        lo.nf4_quantize(w, blocksize=48)
    with pytest.raises(ValueError, match="blocksize"):
        lo.nf4_quantize_reference(w, blocksize=48)
    with pytest.raises(RuntimeError, match="blocksize"):
        torch.ops.llmcore.nf4_quantize_fwd(w, 16)
    with pytest.raises(RuntimeError, match="'w' must be float32, float16 or bfloat16"):
        torch.ops.llmcore.nf4_quantize_fwd(torch.ones(64, dtype=torch.int32), 64)
    with pytest.raises(RuntimeError, match="'w' must be non-empty"):
        torch.ops.llmcore.nf4_quantize_fwd(torch.empty(0), 64)
    with pytest.raises(RuntimeError, match="'code2'"):
        torch.ops.llmcore.nf4_double_quant_fwd(torch.rand(4), torch.rand(255))
    nf = lo.nf4_quantize(w, 64, double_quant=False)
    deq = torch.ops.llmcore.nf4_dequantize_fwd
    with pytest.raises(RuntimeError, match="'packed' must have 32 elements"):
        deq(nf.data[:-1], nf.absmax, None, None, None, 64, [64], torch.float32)
    with pytest.raises(RuntimeError, match="'packed' must be uint8"):
        deq(nf.data.float(), nf.absmax, None, None, None, 64, [64], torch.float32)
    with pytest.raises(RuntimeError, match="'absmax' must have 1 elements"):
        deq(nf.data, torch.ones(2), None, None, None, 64, [64], torch.float32)
    with pytest.raises(RuntimeError, match="'absmax' must be float32"):
        deq(nf.data, nf.absmax.half(), None, None, None, 64, [64], torch.float32)
    with pytest.raises(RuntimeError, match="must be given together"):
        deq(nf.data, nf.absmax, torch.ones(1), None, None, 64, [64], torch.float32)
    with pytest.raises(RuntimeError, match="'dtype'"):
        deq(nf.data, nf.absmax, None, None, None, 64, [64], torch.int32)
    assert deq(torch.empty(0, dtype=torch.uint8), torch.empty(0), None, None, None, 64, [0, 5],
               torch.float32).shape == (0, 5)  # an empty weight dequantizes to an empty tensor


# ------------------------------------------------------------------ opcheck, compile

def test_opcheck():
    w = _weight((33, 70), torch.float32, "cpu")
    torch.library.opcheck(torch.ops.llmcore.nf4_quantize_fwd, (w, 64))
    nf = lo.nf4_quantize(w, 64, double_quant=False)
    torch.library.opcheck(torch.ops.llmcore.nf4_double_quant_fwd, (nf.absmax, dynamic_map_signed()))
    dq = lo.nf4_quantize(w, 64)
    torch.library.opcheck(torch.ops.llmcore.nf4_dequantize_fwd,
                          (dq.data, dq.absmax, dq.absmax2, dq.code2, dq.offset, 64, [33, 70], torch.bfloat16))
    torch.library.opcheck(torch.ops.llmcore.nf4_dequantize_fwd,
                          (nf.data, nf.absmax, None, None, None, 64, [33, 70], torch.float32))


def test_torch_compile_fullgraph():
    nf = lo.nf4_quantize(_weight((65, 130), torch.float32, "cpu"), 64)

    @torch.compile(fullgraph=True)
    def f(data, absmax, absmax2, code2, offset, x):
        w = torch.ops.llmcore.nf4_dequantize_fwd(data, absmax, absmax2, code2, offset, 64, [65, 130], torch.float32)
        return x @ w.t()

    x = torch.randn(3, 130)
    y = f(nf.data, nf.absmax, nf.absmax2, nf.code2, nf.offset, x)
    assert torch.equal(y, x @ lo.nf4_dequantize(nf).t())


def test_reference_backend(monkeypatch):
    w = _weight((5, 64), torch.float32, "cpu")
    fast = lo.nf4_quantize(w)
    monkeypatch.setattr(nf4mod, "use_reference", lambda *a: True)
    _assert_same_nf4(lo.nf4_quantize(w), fast)
    assert torch.equal(lo.nf4_dequantize(fast), lo.nf4_dequantize_reference(fast))


# ------------------------------------------------------------------ bitsandbytes (when installed)

def _bnb_dequantize(bnbF, packed, qs, shape):
    """bitsandbytes' dequantize_4bit, reshaped to `shape`. Its native CPU kernel (0.50.2) reads the
    wrong absmax when blocksize > shape[-1] (it blocks per row; its own torch path and the format
    block the flat tensor), so such weights are dequantized through the flat (n,) view instead."""
    import copy

    if len(shape) > 1 and qs.blocksize > shape[-1]:
        qs = copy.copy(qs)
        qs.shape = torch.Size((qs.shape.numel(),))
    return bnbF.dequantize_4bit(packed, qs).reshape(shape)  # bnb returns (1, n) for a 1-D weight


BNB_SHAPES = [(1,), (7,), (127,), (1025,), (64, 64), (127, 65), (33, 1031), (300, 257)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", BNB_SHAPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_matches_bitsandbytes(dtype, shape, double_quant):
    bnbF = pytest.importorskip("bitsandbytes.functional")
    for bs in BLOCKSIZES:
        w = _weight(shape, dtype, "cpu", seed=bs + 1)
        packed, qs = bnbF.quantize_4bit(w, blocksize=bs, compress_statistics=double_quant, quant_type="nf4")
        nf = lo.nf4_quantize(w, bs, double_quant)
        _assert_same_nf4(nf, NF4Weight.from_bnb(packed, qs))  # packed bytes, absmax, absmax2, code2, offset
        ref = _bnb_dequantize(bnbF, packed, qs, shape)
        assert ref.dtype == dtype and torch.equal(lo.nf4_dequantize(nf), ref)
        # and our bytes handed to bitsandbytes dequantize to the same values
        p2, qs2 = nf.to_bnb()
        assert torch.equal(_bnb_dequantize(bnbF, p2, qs2, shape), ref)


@pytest.mark.parametrize("out_dtype", DTYPES)
def test_matches_bitsandbytes_out_dtypes(out_dtype):
    bnbF = pytest.importorskip("bitsandbytes.functional")
    w = _weight((256, 384), torch.float32, "cpu", seed=9)
    packed, qs = bnbF.quantize_4bit(w.to(out_dtype), blocksize=64, compress_statistics=True, quant_type="nf4")
    nf = NF4Weight.from_bnb(packed, qs)
    assert torch.equal(lo.nf4_dequantize(nf), bnbF.dequantize_4bit(packed, qs))


# ------------------------------------------------------------------ non-finite weights

def _same_or_both_nan(x, y, name):
    x, y = x.cpu().reshape(-1), y.cpu().reshape(-1)
    assert x.dtype == y.dtype, name
    if x.is_floating_point():
        assert torch.equal(torch.isnan(x), torch.isnan(y)), f"{name}: NaN positions differ"
        keep = ~torch.isnan(x)
        x, y = x[keep], y[keep]
    assert torch.equal(x, y), f"{name} differs"


def _non_finite_weight(kind, n=1000, dtype=torch.float32, device="cpu"):
    """n values (15 full 64-blocks and a partial one of 40); the bad values sit in block 1 and in
    the partial last block (n = 1000 is even; 999 would also test the odd pad)."""
    w = _weight((n,), torch.float32, "cpu", seed=5) * 0.1
    bad = {"nan": [float("nan")], "inf": [float("inf")], "-inf": [float("-inf")],
           "nan+inf": [float("nan"), float("inf")]}[kind]
    for j, v in enumerate(bad):
        w[64 + 3 + j] = v
        w[n - 2 - j] = v
    return w.to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["nan", "inf", "-inf", "nan+inf"])
@pytest.mark.parametrize("n", [1000, 999])
def test_non_finite_weights(device, dtype, kind, n):
    """bitsandbytes' rule (its torch path, which the reference follows): a NaN makes its block's
    absmax NaN and the whole block NaN; an inf makes absmax inf, so the inf itself comes back as
    +inf (x / inf = NaN, which takes the top code: the sign is lost, as in bitsandbytes) and every
    other value of the block as 0 * inf = NaN. Other blocks are untouched. With double quant the
    offset mean(absmax) is non-finite and the whole tensor dequantizes to NaN. Before the fix a NaN
    weight came back as -absmax (-2.78 here) and an inf as -inf."""
    w = _non_finite_weight(kind, n, dtype, device)
    nf = lo.nf4_quantize(w, 64, double_quant=False)
    ref = lo.nf4_quantize_reference(w, 64, double_quant=False)
    for x, y, name in zip(_fields(nf), _fields(ref), ["data", "absmax"]):
        _same_or_both_nan(x, y, name)
    d = lo.nf4_dequantize(nf, torch.float32).cpu()
    _same_or_both_nan(d, lo.nf4_dequantize_reference(nf, torch.float32), "dequantized")
    wf = w.float().cpu()
    last = (n // 64) * 64
    for blk in (slice(64, 128), slice(last, n)):
        seg, src = d[blk], wf[blk]
        if "nan" in kind:
            assert torch.isnan(seg).all(), "a NaN weight must make its whole block NaN"
        else:
            assert torch.equal(seg[torch.isinf(src)], torch.full_like(seg[torch.isinf(src)], float("inf")))
            assert torch.isnan(seg[~torch.isinf(src)]).all()
    others = torch.ones(n, dtype=torch.bool)
    others[64:128] = False
    others[last:] = False
    assert torch.isfinite(d[others]).all(), "blocks without a non-finite weight must stay finite"

    dq = lo.nf4_quantize(w, 64, double_quant=True)
    for x, y, name in zip(_fields(dq), _fields(lo.nf4_quantize_reference(w, 64, True)),
                          ["data", "absmax", "absmax2", "code2", "offset"]):
        _same_or_both_nan(x, y, name)
    assert torch.isnan(lo.nf4_dequantize(dq, torch.float32)).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["nan", "inf", "-inf", "nan+inf"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("n", [1000, 999])
def test_non_finite_weights_match_bitsandbytes(dtype, kind, double_quant, n):
    """Bytes, scales and dequantized values as bitsandbytes' CPU quantize_4bit gives them (NaN
    payloads aside: a NaN matches a NaN). One bitsandbytes quirk is not followed: its bf16
    dequantize returns 0.0 (its fp32 dequantize NaN) for a trailing partial block whose absmax is
    NaN; we return NaN in every dtype, so bf16 output is compared through fp32."""
    bnbF = pytest.importorskip("bitsandbytes.functional")
    w = _non_finite_weight(kind, n, dtype)
    packed, qs = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    nf = lo.nf4_quantize(w, 64, double_quant)
    theirs = NF4Weight.from_bnb(packed, qs)
    for x, y, name in zip(_fields(nf), _fields(theirs), ["data", "absmax", "absmax2", "code2", "offset"]):
        _same_or_both_nan(x, y, name)
    qs32 = copy.copy(qs)
    qs32.dtype = torch.float32
    _same_or_both_nan(lo.nf4_dequantize(nf, torch.float32), bnbF.dequantize_4bit(packed, qs32), "dequantized (fp32)")
    if dtype != torch.bfloat16:
        _same_or_both_nan(lo.nf4_dequantize(nf), bnbF.dequantize_4bit(packed, qs), "dequantized")


def test_reference_matches_bitsandbytes():
    """nf4_quantize_reference / nf4_dequantize_reference (the kernels' oracle, compared with them
    bit for bit above) against bitsandbytes directly, so the two cannot share a format bug."""
    bnbF = pytest.importorskip("bitsandbytes.functional")
    for dq in (False, True):
        for shape, bs in (((127, 65), 64), ((33, 1031), 128), ((999,), 32)):
            w = _weight(shape, torch.float32, "cpu", seed=bs)
            packed, qs = bnbF.quantize_4bit(w, blocksize=bs, compress_statistics=dq, quant_type="nf4")
            ref = lo.nf4_quantize_reference(w, bs, dq)
            _assert_same_nf4(ref, NF4Weight.from_bnb(packed, qs))
            assert torch.equal(lo.nf4_dequantize_reference(ref), _bnb_dequantize(bnbF, packed, qs, shape))
