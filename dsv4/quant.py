"""FP8 e4m3 and FP4 e2m1 weight formats of the DeepSeek-V4 checkpoints, in plain PyTorch (CPU and CUDA).

Spec: ARCHITECTURE.md §11.1.
  * FP8: `float8_e4m3fn` weight [out, in] with one power-of-two scale (`float8_e8m0fnu`, "ue8m0") per
    128×128 block, `W[i, j] = Wq[i, j] · scale[i // 128, j // 128]`; edge blocks are partial.
  * FP4: int8 [out, in / 2], each byte holds two e2m1 codes, the LOW nibble the even (first) element;
    one e8m0 scale per 1×32 block along the input dim, scale [out, in / 32].
Quantisation picks the smallest power of two that maps the block's amax into range:
`scale = 2^ceil(log2(amax / max_code))` (max_code 448 for e4m3, 6 for e2m1), then rounds to the nearest
representable value (ties to even). Scales are computed with `frexp`, not `log2`, so an amax that is
exactly a power of two times the max code keeps that power.
"""
from __future__ import annotations

import torch

FP8_MAX = 448.0
FP4_MAX = 6.0
FP8_BLOCK = (128, 128)
FP4_BLOCK = 32
# e2m1 magnitudes of codes 0..7; codes 8..15 are the same with the sign bit set
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# midpoints between consecutive magnitudes; at a midpoint the even code wins (round half to even)
_FP4_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_E8M0_MIN_EXP, _E8M0_MAX_EXP = -127, 127


def _expand_blocks(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """Scale per block [⌈R/br⌉, ⌈C/bc⌉] -> one scale per element [R, C] (fp32)."""
    R, C = shape
    s = scale.float()
    return s.repeat_interleave(block[0], dim=0)[:R].repeat_interleave(block[1], dim=1)[:, :C]


def pow2_scale(amax: torch.Tensor, max_code: float) -> torch.Tensor:
    """2^ceil(log2(amax / max_code)) in fp32, clamped to the e8m0 range (an all-zero block gets 2^-127)."""
    mant, exp = torch.frexp(amax.float() / max_code)          # x = mant · 2^exp, mant in [0.5, 1)
    e = torch.where(mant == 0.5, exp - 1, exp)                 # exact powers of two keep their exponent
    e = torch.where(mant == 0, torch.full_like(e, _E8M0_MIN_EXP), e)
    return torch.exp2(e.clamp(_E8M0_MIN_EXP, _E8M0_MAX_EXP).float())


def check_scale_shape(weight_shape, scale: torch.Tensor, block: tuple[int, int]) -> None:
    R, C = weight_shape
    want = (-(-R // block[0]), -(-C // block[1]))
    if tuple(scale.shape) != want:
        raise ValueError(f"scale has shape {tuple(scale.shape)}, expected {want} for a weight {tuple(weight_shape)} "
                         f"with {block[0]}x{block[1]} blocks")


# ----------------------------------------------------------------------------- FP8 e4m3
def dequant_fp8(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = FP8_BLOCK,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """e4m3 weight [R, C] · e8m0 (or fp32) scale per block -> [R, C] in `dtype` (computed in fp32)."""
    if weight.dim() != 2:
        raise ValueError(f"FP8 weight must be 2-D, got shape {tuple(weight.shape)}")
    check_scale_shape(weight.shape, scale, block)
    return (weight.float() * _expand_blocks(scale, tuple(weight.shape), block)).to(dtype)


def quant_fp8(w: torch.Tensor, block: tuple[int, int] = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, C] -> (e4m3 weight [R, C], e8m0 scale [⌈R/br⌉, ⌈C/bc⌉]); edge blocks use their partial amax."""
    if w.dim() != 2:
        raise ValueError(f"FP8 quantisation takes a 2-D weight, got shape {tuple(w.shape)}")
    R, C = w.shape
    br, bc = block
    nr, nc = -(-R // br), -(-C // bc)
    wf = w.float()
    padded = wf.new_zeros(nr * br, nc * bc)
    padded[:R, :C] = wf.abs()
    amax = padded.view(nr, br, nc, bc).amax(dim=(1, 3))                      # [nr, nc]
    scale = pow2_scale(amax, FP8_MAX)
    q = (wf / _expand_blocks(scale, (R, C), block)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale.to(torch.float8_e8m0fnu)


# ----------------------------------------------------------------------------- FP4 e2m1
def fp4_codes_to_values(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (any integer dtype, values 0..15) -> fp32 values."""
    table = torch.tensor(FP4_VALUES + tuple(-v for v in FP4_VALUES), dtype=torch.float32, device=codes.device)
    return table[codes.long()]


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """int8/uint8 [R, C/2] -> codes uint8 [R, C]: the low nibble is the even element."""
    u = packed.view(torch.uint8) if packed.dtype == torch.int8 else packed
    return torch.stack([u & 0x0F, u >> 4], dim=-1).flatten(-2)                # [R, C]


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """codes [R, C] (C even, values 0..15) -> int8 [R, C/2], even element in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"FP4 packing needs an even number of columns, got {codes.shape[-1]}")
    c = codes.to(torch.uint8).unflatten(-1, (-1, 2))
    return (c[..., 0] | (c[..., 1] << 4)).view(torch.int8)


def dequant_fp4(packed: torch.Tensor, scale: torch.Tensor, block: int = FP4_BLOCK,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed e2m1 [R, C/2] · scale [R, ⌈C/block⌉] -> [R, C] in `dtype`."""
    if packed.dim() != 2:
        raise ValueError(f"FP4 weight must be 2-D, got shape {tuple(packed.shape)}")
    R, half = packed.shape
    check_scale_shape((R, 2 * half), scale, (1, block))
    values = fp4_codes_to_values(unpack_fp4(packed))                         # [R, C]
    return (values * _expand_blocks(scale, (R, 2 * half), (1, block))).to(dtype)


def fp4_round(x: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 of the nearest e2m1 values of x (|x| ≤ 6 expected; larger saturates to ±6)."""
    a = x.abs()
    code = torch.zeros_like(a, dtype=torch.uint8)
    for k, t in enumerate(_FP4_MIDPOINTS):
        # a tie goes to the even code: up when code k+1 is even (k odd), down otherwise
        code += (a >= t if k % 2 else a > t).to(torch.uint8)
    return code | ((x < 0) & (code > 0)).to(torch.uint8) << 3


def quant_fp4(w: torch.Tensor, block: int = FP4_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, C] (C even) -> (packed int8 [R, C/2], e8m0 scale [R, ⌈C/block⌉])."""
    if w.dim() != 2:
        raise ValueError(f"FP4 quantisation takes a 2-D weight, got shape {tuple(w.shape)}")
    R, C = w.shape
    nb = -(-C // block)
    wf = w.float()
    padded = wf.new_zeros(R, nb * block)
    padded[:, :C] = wf.abs()
    scale = pow2_scale(padded.view(R, nb, block).amax(dim=-1), FP4_MAX)     # [R, nb]
    codes = fp4_round(wf / _expand_blocks(scale, (R, C), (1, block)))
    return pack_fp4(codes), scale.to(torch.float8_e8m0fnu)


def fake_quant(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """w rounded through a format and back ('fp8' or 'fp4'), in w's dtype: what a save/load keeps."""
    if fmt == "fp8":
        return dequant_fp8(*quant_fp8(w), dtype=w.dtype)
    if fmt == "fp4":
        return dequant_fp4(*quant_fp4(w), dtype=w.dtype)
    raise ValueError(f"unknown weight format {fmt!r}; expected 'fp8' or 'fp4'")
