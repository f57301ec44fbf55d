"""NF4 (4-bit NormalFloat) quantize / dequantize, bitsandbytes' format exactly.

    nf4 = nf4_quantize(w, blocksize=64, double_quant=True)   # -> NF4Weight
    w_hat = nf4_dequantize(nf4, out_dtype=None)              # -> Tensor of w.shape

Format (so weights move between llmcore and bitsandbytes unchanged: `NF4Weight.from_bnb`,
`NF4Weight.to_bnb`):
- w is read as one flat vector of n = w.numel() values (row-major), cut into blocks of `blocksize`
  consecutive values (32, 64, 128, ..., 4096); absmax[b] = max |w| over block b, fp32.
- Each value becomes the index k (0..15) of the NF4 code nearest to w / absmax[b] (NF4_CODE below;
  a tie goes to the lower code). Two indices per byte, the FIRST value of each pair in the HIGH
  nibble: packed is uint8 of ceil(n / 2) bytes.
- Padding rule (n not a multiple of the blocksize, or odd): the last block is simply shorter; its
  absmax is max(max|w|, 1e-38) (bitsandbytes clamps it there) and its values are divided by it
  (full blocks multiply by the reciprocal — bitsandbytes' CPU rule, reproduced bit for bit). An odd
  n leaves code 7 (0.0, the quantized pad) in the last byte's low nibble. Nothing else is padded.
- Double quantization (default, QLoRA's): offset = mean(absmax) (fp32, torch's reduction);
  absmax - offset is quantized blockwise with blocksize 256 to uint8 indices into `code2`, the signed
  8-bit dynamic map of bitsandbytes (`dynamic_map_signed()`), with fp32 absmax2 per 256 blocks:
  4.127 bits per weight instead of 4.5. The 8-bit rounding is bitsandbytes' CPU one (a 65536-step
  grid over [-1, 1] then the nearest code), used on every device.
- Non-finite weights, as bitsandbytes: a NaN makes its block's absmax NaN, so the whole block
  dequantizes to NaN; an inf (either sign) makes absmax inf: the inf itself comes back as +inf
  (inf / inf = NaN takes the top code; bitsandbytes loses the sign too) and every other value of
  the block as 0 * inf = NaN. Other blocks are unaffected. With double quant the offset
  mean(absmax) is then non-finite and the whole tensor dequantizes to NaN.
Dequantize numerics: a_b = fl(fl(code2[qabsmax[b]] * absmax2[b // 256]) + offset) (or absmax[b]);
out = fl(NF4[k] * a_b) in fp32, then one rounding to out_dtype: identical bits to bitsandbytes'
dequantize_4bit. CUDA does it in one launch, double quant included (bitsandbytes uses two).
Quantize and dequantize are not differentiable (frozen weights; see llmcore.nn.NF4Linear).
"""
from dataclasses import dataclass, replace
from typing import Optional

import torch

from llmcore.ops._lib import ops, use_reference

NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
BLOCKSIZE2 = 256
_TINY = 1e-38

_code2_cache = {}


def dynamic_map_signed() -> torch.Tensor:
    """bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): 256 sorted
    fp32 values in [-0.99297, 1], the second-level code of double quantization."""
    data = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data.append(0)
    data.append(1.0)
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def _code2(device) -> torch.Tensor:
    key = str(device)
    if key not in _code2_cache:
        _code2_cache[key] = dynamic_map_signed().to(device)
    return _code2_cache[key]


@dataclass
class NF4Weight:
    """A frozen NF4-quantized tensor (layout in the module docstring).

    data:    uint8 (ceil(numel / 2),) packed codes, first value of each pair in the high nibble
    absmax:  fp32 (nblocks,) per-block scales, or uint8 (nblocks,) quantized scales when double-quantized
    shape, dtype: the original tensor's shape and dtype (dequantize's default out_dtype)
    blocksize: values per block
    absmax2: fp32 (ceil(nblocks / 256),) second-level scales (double quant only)
    code2:   fp32 (256,) second-level code (double quant only)
    offset:  fp32 0-d, mean of the first-level scales (double quant only)
    """
    data: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    absmax2: Optional[torch.Tensor] = None
    code2: Optional[torch.Tensor] = None
    offset: Optional[torch.Tensor] = None

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def device(self) -> torch.device:
        return self.data.device

    def nbytes(self) -> int:
        """Storage bytes: packed codes + scales (+ second-level state)."""
        ts = [self.data, self.absmax] + ([self.absmax2, self.code2, self.offset] if self.double_quant else [])
        return sum(t.numel() * t.element_size() for t in ts)

    def to(self, device) -> "NF4Weight":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, data=mv(self.data), absmax=mv(self.absmax), absmax2=mv(self.absmax2),
                       code2=mv(self.code2), offset=mv(self.offset))

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state) -> "NF4Weight":
        """From bitsandbytes' (packed uint8 ((n+1)//2, 1), QuantState) of quant_type "nf4"."""
        qs = quant_state
        if qs.quant_type != "nf4":
            raise ValueError(f"quant_state.quant_type must be 'nf4', got {qs.quant_type!r}")
        if packed.dtype != torch.uint8:
            packed = packed.reshape(-1).view(torch.uint8)  # quant_storage other than uint8
        kw = dict(data=packed.reshape(-1), shape=torch.Size(qs.shape), dtype=qs.dtype, blocksize=int(qs.blocksize))
        if qs.nested:
            if int(qs.state2.blocksize) != BLOCKSIZE2:
                raise ValueError(f"double-quant blocksize must be {BLOCKSIZE2}, got {qs.state2.blocksize}")
            off = torch.as_tensor(qs.offset, dtype=torch.float32, device=packed.device).reshape(())
            return cls(absmax=qs.absmax.reshape(-1), absmax2=qs.state2.absmax.reshape(-1).float(),
                       code2=qs.state2.code.float(), offset=off, **kw)
        return cls(absmax=qs.absmax.reshape(-1).float(), **kw)

    def to_bnb(self):
        """To bitsandbytes: (packed uint8 ((n+1)//2, 1), QuantState). Needs bitsandbytes installed."""
        from bitsandbytes.functional import QuantState

        code = torch.tensor(NF4_CODE, dtype=torch.float32, device=self.device)
        state2 = None
        if self.double_quant:
            state2 = QuantState(absmax=self.absmax2, code=self.code2, blocksize=BLOCKSIZE2, dtype=torch.float32)
        qs = QuantState(absmax=self.absmax, shape=torch.Size(self.shape), code=code, blocksize=self.blocksize,
                        quant_type="nf4", dtype=self.dtype, offset=self.offset, state2=state2)
        return self.data.reshape(-1, 1), qs


# ---------------------------------------------------------------- references (pure PyTorch, fp32)

def _nf4_mids(device):
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    return (code[:-1] + code[1:]) / 2


def nf4_quantize_reference(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Pure-PyTorch twin of nf4_quantize (same rules, same bits; written like bitsandbytes' own
    torch path for the 4-bit step and like its CPU C++ LUT for the 8-bit step)."""
    _check_quantize_args(w, blocksize)
    flat = w.detach().reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=-1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=_TINY)).view(-1, 1), -1, 1).reshape(-1)
    if full < n:
        am = flat[full:].abs().max().clamp(min=_TINY)
        absmax = torch.cat([absmax, am.reshape(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    if n % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = torch.bucketize(scaled, _nf4_mids(w.device)).to(torch.uint8)  # count of midpoints < x
    packed = (q[0::2] << 4) | q[1::2]
    nf4 = NF4Weight(data=packed, absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize)
    if not double_quant:
        return nf4
    offset = absmax.mean()
    qabs, absmax2 = _quantize_8bit_reference(absmax - offset, _code2(w.device))
    return replace(nf4, absmax=qabs, absmax2=absmax2, code2=_code2(w.device), offset=offset)


def _quantize_8bit_reference(x: torch.Tensor, code: torch.Tensor):
    """bitsandbytes' CPU blockwise 8-bit quantizer (blocksize 256): t = clamp(x / a2, -1, 1);
    i = trunc(fl32(((t + 1) / 2) * 65535 + 0.5)) (one rounding, as its FMA); v_i = -1 + 2i / 65535;
    index = count of code midpoints < v_i."""
    n = x.numel()
    pad = (-n) % BLOCKSIZE2
    xb = torch.nn.functional.pad(x, (0, pad)).reshape(-1, BLOCKSIZE2)
    ax = xb.abs()
    a2 = torch.where(torch.isnan(ax), 0.0, ax).amax(dim=-1)  # NaN ignored (its C max); zero padding never raises it
    inv = torch.where(a2 == 0, torch.zeros_like(a2), 1.0 / torch.where(a2 == 0, torch.ones_like(a2), a2))
    t = torch.clamp(xb * inv.view(-1, 1), -1, 1)
    t = (t + 1.0) * 0.5
    idx = (t.double() * 65535.0 + 0.5).float().floor()  # exact in fp64, one fp32 rounding
    idx = torch.nan_to_num(idx, nan=0.0).to(torch.int64)  # NaN (a non-finite scale) -> index 0
    val = (2.0 * idx.float()) / 65535.0 - 1.0
    mids = 0.5 * (code[:-1] + code[1:])
    q = torch.searchsorted(mids, val.reshape(-1).contiguous()).reshape(xb.shape)
    q = torch.where(a2.view(-1, 1) == 0, torch.zeros_like(q), q)
    return q.to(torch.uint8).reshape(-1)[:n], a2


def _scales_reference(nf4: NF4Weight) -> torch.Tensor:
    if not nf4.double_quant:
        return nf4.absmax.float()
    nb = nf4.absmax.numel()
    a2 = nf4.absmax2.repeat_interleave(BLOCKSIZE2)[:nb]
    return nf4.code2[nf4.absmax.long()] * a2 + nf4.offset  # two roundings, like bitsandbytes


def nf4_dequantize_reference(nf4: NF4Weight, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Pure-PyTorch twin of nf4_dequantize: fl(NF4[k] * a_b) in fp32, then out_dtype."""
    out_dtype = out_dtype or nf4.dtype
    n = nf4.numel
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=nf4.device)
    d = nf4.data.reshape(-1)
    q = torch.stack([d >> 4, d & 15], dim=-1).reshape(-1)[:n].long()
    scale = _scales_reference(nf4).repeat_interleave(nf4.blocksize)[:n]
    return (code[q] * scale).to(out_dtype).reshape(nf4.shape)


# ---------------------------------------------------------------- public functions

def _check_quantize_args(w, blocksize):
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"nf4: argument 'blocksize' must be one of {BLOCKSIZES}, got {blocksize}")
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"nf4: argument 'w' must be float32, float16 or bfloat16, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"nf4: argument 'w' must be non-empty, got shape {tuple(w.shape)}")


def nf4_quantize(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize w (any shape; fp32/fp16/bf16; CPU or CUDA) to NF4. See the module docstring.
    Not differentiable (a one-time conversion of a frozen weight)."""
    if use_reference("nf4_quantize", w):
        return nf4_quantize_reference(w, blocksize, double_quant)
    packed, absmax = ops.nf4_quantize_fwd(w.detach(), blocksize)
    nf4 = NF4Weight(data=packed, absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize)
    if not double_quant:
        return nf4
    code2 = _code2(w.device)
    qabs, absmax2, offset = ops.nf4_double_quant_fwd(absmax, code2)
    return replace(nf4, absmax=qabs, absmax2=absmax2, code2=code2, offset=offset)


def nf4_dequantize(nf4: NF4Weight, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Dequantize to a new contiguous tensor of nf4.shape in out_dtype (default nf4.dtype):
    fl(NF4[k] * a_b) in fp32, one rounding to out_dtype. Bit-identical to bitsandbytes."""
    out_dtype = out_dtype or nf4.dtype
    if use_reference("nf4_dequantize", nf4.data):
        return nf4_dequantize_reference(nf4, out_dtype)
    return ops.nf4_dequantize_fwd(nf4.data, nf4.absmax, nf4.absmax2, nf4.code2, nf4.offset, nf4.blocksize,
                                  list(nf4.shape), out_dtype)


# ---------------------------------------------------------------- fake kernels

@torch.library.register_fake("llmcore::nf4_quantize_fwd")
def _nf4_quantize_fwd_fake(w, blocksize):
    n = w.numel()
    return w.new_empty(((n + 1) // 2,), dtype=torch.uint8), w.new_empty(((n + blocksize - 1) // blocksize,),
                                                                        dtype=torch.float32)


@torch.library.register_fake("llmcore::nf4_double_quant_fwd")
def _nf4_double_quant_fwd_fake(absmax, code2):
    nb = absmax.numel()
    return (absmax.new_empty((nb,), dtype=torch.uint8), absmax.new_empty(((nb + BLOCKSIZE2 - 1) // BLOCKSIZE2,)),
            absmax.new_empty(()))


@torch.library.register_fake("llmcore::nf4_dequantize_fwd")
def _nf4_dequantize_fwd_fake(packed, absmax, absmax2, code2, offset, blocksize, shape, dtype):
    return packed.new_empty(shape, dtype=dtype)
