"""Packed fp16 arithmetic for the decode GEMVs: two multiply-adds per instruction.

A decode GEMV on quantised weights is bound by the instructions it issues per weight byte, not by memory:
an H200 SM streams ~16 bytes a clock from HBM and issues 128 thread instructions a clock, so ~8 per byte
is the budget. Decoding a code to fp32, converting and one fp32 FMA per weight spend it (the FP4 word
kernel issued 10.2 per byte on sm90). Here the weights are decoded straight to fp16 pairs (two codes in
one 32-bit register) and multiplied with x pairs by `fma.rn.f16x2`, one instruction for two products; a
run of products is summed in fp16, then in fp32 (the FP4 word kernel: 7.9 per byte, `fp4_moe`). The
scaling and conversion of x cost what the products save where a thread's x serves only one row of
weights (an FP8 GEMV written this way issued more instructions per byte than the fp32 one), so only the
FP4 experts use it.

Why fp16 stays exact enough, and never overflows: x is scaled by a power of two chosen from max |x| of
the row (`x_scale`), so that every scaled x lies below 2^XE in magnitude, where the caller picks XE
from its weights' largest value and the length of its fp16 runs (sums stay far below 65504). Scaling
by a power of two is exact, and bf16 activations convert to fp16 exactly in that range (to within
2^-25 of the row's maximum below it). What remains is the fp16 rounding of each product and running
sum (2^-11 relative), against the bf16 rounding (2^-9) of the output these kernels write: the paths
that use this write bf16 or fp16 only; fp32 activations keep the fp32 kernels.

`ASM` selects the PTX instructions (a GPU); without it (the interpreter) the same arithmetic runs on
unpacked halves in fp32 with one rounding to fp16 per operation, so the CPU tests check the numerics of
the scheme, and the GPU tests the instructions.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def lo_f16(v):
    """The low fp16 of int32 words holding two."""
    return (v & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def hi_f16(v):
    """The high fp16 of int32 words holding two."""
    return (v >> 16).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def pack_f16(lo, hi):
    """Two fp16 tensors -> int32 words holding both (lo in the low half)."""
    a = lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    b = hi.to(tl.int16, bitcast=True).to(tl.int32) << 16
    return a | b


@triton.jit
def pair_f16(lo, hi, ASM: tl.constexpr):
    """fp32 tensors -> int32 words of their fp16 roundings (round to nearest even), lo in the low half."""
    if ASM:
        return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,r,r", [lo, hi], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:
        return pack_f16(lo.to(tl.float16), hi.to(tl.float16))


@triton.jit
def hfma2(a, b, c, ASM: tl.constexpr):
    """a·b + c on the two fp16 halves of int32 words, each rounded once to fp16."""
    if ASM:
        return tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:
        lo = lo_f16(a).to(tl.float32) * lo_f16(b).to(tl.float32) + lo_f16(c).to(tl.float32)
        hi = hi_f16(a).to(tl.float32) * hi_f16(b).to(tl.float32) + hi_f16(c).to(tl.float32)
        return pack_f16(lo.to(tl.float16), hi.to(tl.float16))


@triton.jit
def hadd2(a, b, ASM: tl.constexpr):
    """a + b on the two fp16 halves of int32 words."""
    if ASM:
        return tl.inline_asm_elementwise("add.rn.f16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:
        lo = lo_f16(a).to(tl.float32) + lo_f16(b).to(tl.float32)
        hi = hi_f16(a).to(tl.float32) + hi_f16(b).to(tl.float32)
        return pack_f16(lo.to(tl.float16), hi.to(tl.float16))


@triton.jit
def sum_f32(v):
    """The sum of the two fp16 halves of int32 words, in fp32."""
    return lo_f16(v).to(tl.float32) + hi_f16(v).to(tl.float32)


@triton.jit
def x_scale(amax, XE: tl.constexpr):
    """(s, 1/s) for a row whose largest magnitude is amax (fp32 scalar): s = 2^(XE - 1 - e) with
    e = floor(log2 amax), so |x·s| < 2^XE for every x of the row. e is clamped to [-110, 126] (both
    factors stay normal fp32): a zero row gets a finite s, and a row with inf or NaN stays non-finite."""
    e = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.minimum(tl.maximum(e, -110), 126)
    s = ((127 + XE - 1 - e) << 23).to(tl.float32, bitcast=True)
    inv = ((127 - XE + 1 + e) << 23).to(tl.float32, bitcast=True)
    return s, inv
