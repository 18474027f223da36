"""Grouped MoE expert GEMMs on FP4 e2m1 weights in Triton (routed experts of the DeepSeek-V4 releases).

Spec: ARCHITECTURE.md §8.4 (clamped SwiGLU, routing weight before w2), §11.1 (FP4 experts: int8 bytes
holding two e2m1 codes, the low nibble the even element, one e8m0 scale per 1×32 block along K).

    y_t = Σ_k W2[e_k] · (weight_tk · SwiGLU(W1[e_k] x_t, W3[e_k] x_t))

Two paths, both without host synchronisation (CUDA-graph capturable), chosen from the shapes (prefill
on sm90 goes elsewhere: `dsv4.ops.fp4_experts_dequant`, on `dequant_fp4` below and grouped GEMMs):

- few pairs per expert (decode: at most one pair per expert on average), `_fp4_up_gemv_kernel` and
  `_fp4_down_gemv_kernel`: one program per (pair, tile of output rows), a GEMV that reads the pair's
  expert rows once, decodes them in registers and reduces along K with no `tl.dot` (no sorting or
  padding of pairs either: the expert id is read from `idx` in the kernel). Decoding, not memory,
  bounds this path, so it is lean: each thread holds whole 16-byte scale blocks (one vector load), a
  code becomes a float with four integer operations (`_e2m1_pair`), and the block scale multiplies the
  block's partial sum rather than every weight (`_gemv_tile`). `bench/sass_fp4_gemv.py` counts the
  instructions per weight byte offline (sm90: ~20, against ~54 when every weight was scaled).
  `_fp4_up_words_kernel` / `_fp4_down_words_kernel` do the same on int32 words, two codes per integer
  operation (`_e2m1_word_pair`: each 16-bit half of a word becomes one fp16 code), with a warp's lanes
  on consecutive blocks and a thread's rows sharing its reads of x (~10 SASS per byte), the default.
  `DECODE_KERNEL` picks one; `bench/probe_flash_decode.py` times both from HBM (V4-Flash shapes, 6
  experts from HBM on an H200: 50 against 78 us at batch 1, 81 against 134 us at batch 2). For bf16/fp16
  activations the word kernels multiply in packed fp16 (`WORDS_MATH = "half"`, `half2`): x (or h) scaled
  by a power of two from its row's max |x| so that |x·s| < 2^14, one `fma.rn.f16x2` per two codes, a
  32-value block's products summed in fp16 (each product below 6, the sum below 96), then in fp32 times
  the block scale and 1/s; 7.9 against 10.2 SASS per byte, 39-42 against 43-48 us for the 6 experts at
  batch 1 (`bench/sass_fp4_gemv.py --words`, `bench/probe_flash_decode.py`). fp32 activations keep fp32 arithmetic.
  `WORDS_PIPE` double-buffers the word kernels' K loop in registers (the next step's loads in flight
  while a step computes: Triton's pipeliner leaves them in the step that uses them), at the price of
  registers (128 against 80 for the gate/up program: 4 programs an SM against 6);
- otherwise the tiled kernels below, two over blocks of pairs of one expert:
  1. `_fp4_up_kernel`: per block of pairs of one expert, g = x·W1ᵀ and u = x·W3ᵀ (x rows gathered by
     token), the clamped SwiGLU and the routing weight in fp32, h stored in the activation dtype;
  2. `_fp4_down_kernel`: out = h·W2ᵀ per pair.
The per-token sum of the K pair outputs is one launch afterwards (`_pair_sum_kernel`, fp32, no atomics:
deterministic).

Pairs are sorted by expert and each expert's run is padded to whole blocks of BM rows (`_align`,
vectorised torch ops): `row_map` gives each padded row its pair (or −1) and `block_expert` each block
its expert (or −1). The grid has the static upper bound of blocks; programs of unused blocks do no
work. Expert ids outside [0, E) mean "not on this device" (expert parallelism): those pairs give 0.

Weights are decoded in registers: e2m1 code -> fp32 by integer operations, times the e8m0 block scale
(exact in bf16: a 2-bit significand times a power of two), then a plain `tl.dot` with fp32
accumulation. The packed layout is consumed without unpacking: the even columns of x meet the low
nibbles, the odd columns the high nibbles, two dots per K tile. No Hopper-only instructions. Under
`TRITON_INTERPRET=1` dots run in fp32 with one small tile configuration (and, as in fp8_gemm, only
core `tl` builtins are used).

Twin: `dsv4.ops.fp4_experts_torch` (same signature).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import half2
from .fp8_gemm import INTERPRET, e8m0_to_fp32
from .launch import cdiv, launchable, next_pow2, pdl, pdl_start


@triton.jit
def e2m1_to_fp32(c):
    """e2m1 codes (int32, 0..15) -> fp32: 0, .5, 1, 1.5, 2, 3, 4, 6 and their negatives (bit 3 = sign)."""
    m = c & 7
    normal = ((m << 22) + (126 << 23)).to(tl.float32, bitcast=True)    # m >= 2: 2^((m>>1)-1)·(1 + (m&1)/2)
    v = tl.where(m < 2, m.to(tl.float32) * 0.5, normal)
    return tl.where((c & 8) != 0, -v, v)


@triton.jit
def _fp4_tile(w_ptrs, s_ptrs, mask):
    """Packed bytes [BN, BK/2] and their scales -> (even-column, odd-column) weights [BN, BK/2] in fp32."""
    b = tl.load(w_ptrs, mask=mask, other=0).to(tl.int32) & 0xFF
    s = e8m0_to_fp32(tl.load(s_ptrs, mask=mask, other=127).to(tl.int32))
    return e2m1_to_fp32(b & 0xF) * s, e2m1_to_fp32(b >> 4) * s


@triton.jit
def _dot2(a_even, a_odd, w_even, w_odd, acc, DOT_FP32: tl.constexpr):
    """acc + a_even · w_evenᵀ + a_odd · w_oddᵀ; the fp32 weights are cast to the activation dtype (exact)."""
    if DOT_FP32:
        acc = tl.dot(a_even.to(tl.float32), tl.trans(w_even), acc, input_precision="ieee")
        acc = tl.dot(a_odd.to(tl.float32), tl.trans(w_odd), acc, input_precision="ieee")
    else:
        acc = tl.dot(a_even, tl.trans(w_even.to(a_even.dtype)), acc)
        acc = tl.dot(a_odd, tl.trans(w_odd.to(a_odd.dtype)), acc)
    return acc


@launchable
@triton.jit
def _fp4_up_kernel(x_ptr, w1_ptr, s1_ptr, w3_ptr, s3_ptr, rw_ptr, row_map_ptr, block_expert_ptr, h_ptr,
                   D, I, TOPK, n_blocks, limit,
                   stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_hm,
                   HAS_LIMIT: tl.constexpr, DOT_FP32: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_start(PDL)
    pid_n = tl.program_id(1)
    HK: tl.constexpr = BK // 2
    # one iteration for a used block, none for the unused tail of the static grid
    for blk in range(tl.program_id(0), tl.load(n_blocks), tl.num_programs(0)):
        e = tl.load(block_expert_ptr + blk).to(tl.int64)
        rows = tl.load(row_map_ptr + blk * BM + tl.arange(0, BM))               # [BM] pair ids, -1 = padding
        valid = rows >= 0
        tok = tl.where(valid, rows // TOPK, 0).to(tl.int64)
        rn = pid_n * BN + tl.arange(0, BN)
        n_ok = rn < I
        j = tl.arange(0, HK)
        acc_g = tl.full((BM, BN), 0.0, tl.float32)
        acc_u = tl.full((BM, BN), 0.0, tl.float32)
        w_off = e * stride_we + rn[:, None] * stride_wn
        s_off = e * stride_se + rn[:, None] * stride_sn
        for k0 in range(0, D, BK):
            kk = k0 + 2 * j                                                      # even columns of this tile
            k_ok = kk < D
            a_mask = valid[:, None] & k_ok[None, :]
            xe = tl.load(x_ptr + tok[:, None] * stride_xm + kk[None, :], mask=a_mask, other=0.0)
            xo = tl.load(x_ptr + tok[:, None] * stride_xm + kk[None, :] + 1, mask=a_mask, other=0.0)
            w_mask = n_ok[:, None] & k_ok[None, :]
            byte = (k0 // 2 + j)[None, :]
            blk32 = (kk // 32)[None, :]
            w1e, w1o = _fp4_tile(w1_ptr + w_off + byte, s1_ptr + s_off + blk32, w_mask)
            acc_g = _dot2(xe, xo, w1e, w1o, acc_g, DOT_FP32)
            w3e, w3o = _fp4_tile(w3_ptr + w_off + byte, s3_ptr + s_off + blk32, w_mask)
            acc_u = _dot2(xe, xo, w3e, w3o, acc_u, DOT_FP32)
        g, u = acc_g, acc_u
        if HAS_LIMIT:                                    # spec §8.4: up in [-limit, limit], gate <= limit
            u = tl.minimum(tl.maximum(u, -limit), limit)
            g = tl.minimum(g, limit)
        rw = tl.load(rw_ptr + tl.where(valid, rows, 0), mask=valid, other=0.0).to(tl.float32)
        h = g / (1.0 + tl.exp(-g)) * u * rw[:, None]                       # silu(g) · u · routing weight
        h_ptrs = h_ptr + tl.where(valid, rows, 0).to(tl.int64)[:, None] * stride_hm + rn[None, :]
        tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


@launchable
@triton.jit
def _fp4_down_kernel(h_ptr, w2_ptr, s2_ptr, row_map_ptr, block_expert_ptr, out_ptr,
                     D, I, n_blocks, stride_hm, stride_we, stride_wn, stride_se, stride_sn, stride_om,
                     DOT_FP32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     PDL: tl.constexpr = False):
    pdl_start(PDL)
    pid_n = tl.program_id(1)
    HK: tl.constexpr = BK // 2
    for blk in range(tl.program_id(0), tl.load(n_blocks), tl.num_programs(0)):
        e = tl.load(block_expert_ptr + blk).to(tl.int64)
        rows = tl.load(row_map_ptr + blk * BM + tl.arange(0, BM))
        valid = rows >= 0
        r = tl.where(valid, rows, 0).to(tl.int64)
        rn = pid_n * BN + tl.arange(0, BN)
        n_ok = rn < D
        j = tl.arange(0, HK)
        acc = tl.full((BM, BN), 0.0, tl.float32)
        w_off = e * stride_we + rn[:, None] * stride_wn
        s_off = e * stride_se + rn[:, None] * stride_sn
        for k0 in range(0, I, BK):
            kk = k0 + 2 * j
            k_ok = kk < I
            a_mask = valid[:, None] & k_ok[None, :]
            he = tl.load(h_ptr + r[:, None] * stride_hm + kk[None, :], mask=a_mask, other=0.0)
            ho = tl.load(h_ptr + r[:, None] * stride_hm + kk[None, :] + 1, mask=a_mask, other=0.0)
            we, wo = _fp4_tile(w2_ptr + w_off + (k0 // 2 + j)[None, :], s2_ptr + s_off + (kk // 32)[None, :],
                               n_ok[:, None] & k_ok[None, :])
            acc = _dot2(he, ho, we, wo, acc, DOT_FP32)
        tl.store(out_ptr + r[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=valid[:, None] & n_ok[None, :])


@triton.jit
def _e2m1_pair(b):
    """Bytes (int32, 0..255) -> (low, high) nibble values times 2^-14, in fp32, with four integer ops
    per nibble and no select: the nibble's 3 magnitude bits placed at bits 9-11 of an fp16 are its
    exponent and top mantissa bit, and as an fp16 the code is worth exactly 2^-14 times its e2m1 value
    (subnormal code 1 included); the sign goes to bit 15. The 2^14 is folded into the block scale."""
    lo = ((b & 7) << 9) | ((b & 8) << 12)
    hi = ((b & 0x70) << 5) | ((b & 0x80) << 8)
    return (lo.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32),
            hi.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32))


@triton.jit
def _gemv_tile(w_ptr, s_ptr, w_off, s_off, x_ptr, kx, k0, K, n_ok, jb, t, acc,
               BN: tl.constexpr, NB: tl.constexpr):
    """acc[n, b] += scale[n, b] · Σ_t code[n, b, t] · x: one K tile of NB blocks of 32 values (16 packed
    bytes each) for BN rows. Each thread holds whole 16-byte blocks, so the sum over a block stays in
    registers; the power-of-two block scale multiplies the partial sum (exact) instead of every weight.
    `kx` [NB, 16] are the offsets of the even x values of this tile (odd: +1)."""
    blk_ok = (k0 + 32 * jb) < K                                                            # [NB]
    xm = blk_ok[:, None] & (t >= 0)[None, :]
    xe = tl.load(x_ptr + kx, mask=xm, other=0.0).to(tl.float32)[None, :, :]              # [1, NB, 16]
    xo = tl.load(x_ptr + kx + 1, mask=xm, other=0.0).to(tl.float32)[None, :, :]
    bmask = n_ok[:, None, None] & xm[None, :, :]
    b = tl.load(w_ptr + w_off + (k0 // 2 + 16 * jb[None, :, None] + t[None, None, :]), mask=bmask,
                other=0).to(tl.int32) & 0xFF                                              # [BN, NB, 16]
    ce, co = _e2m1_pair(b)
    part = tl.sum(ce * xe + co * xo, 2)                                                   # [BN, NB]
    smask = n_ok[:, None] & blk_ok[None, :]
    sc = e8m0_to_fp32(tl.load(s_ptr + s_off + (k0 // 32 + jb[None, :]), mask=smask, other=127).to(tl.int32))
    return acc + part * sc


@launchable
@triton.jit
def _fp4_up_gemv_kernel(x_ptr, w1_ptr, s1_ptr, w3_ptr, s3_ptr, rw_ptr, idx_ptr, h_ptr,
                        D, I, TOPK, E, limit,
                        stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_hm,
                        HAS_LIMIT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr = False):
    """h[p, n-tile] = routing weight · SwiGLU(W1[e] x, W3[e] x) for pair p = (token p // TOPK, expert e)."""
    pdl_start(PDL)
    p, pid_n = tl.program_id(0), tl.program_id(1)
    NB: tl.constexpr = BK // 32
    e = tl.load(idx_ptr + p).to(tl.int64)
    if (e >= 0) & (e < E):                        # a pair of another device's expert: h is not read
        tok = (p // TOPK).to(tl.int64)
        rn = pid_n * BN + tl.arange(0, BN)
        n_ok = rn < I
        jb = tl.arange(0, NB)
        t = tl.arange(0, 16)
        acc_g = tl.full((BN, NB), 0.0, tl.float32)
        acc_u = tl.full((BN, NB), 0.0, tl.float32)
        w_off = e * stride_we + rn[:, None, None] * stride_wn
        s_off = e * stride_se + rn[:, None] * stride_sn
        xrow = x_ptr + tok * stride_xm
        for k0 in range(0, D, BK):
            kx = k0 + 32 * jb[:, None] + 2 * t[None, :]
            acc_g = _gemv_tile(w1_ptr, s1_ptr, w_off, s_off, xrow, kx, k0, D, n_ok, jb, t, acc_g, BN, NB)
            acc_u = _gemv_tile(w3_ptr, s3_ptr, w_off, s_off, xrow, kx, k0, D, n_ok, jb, t, acc_u, BN, NB)
        g = tl.sum(acc_g, 1) * 16384.0            # the 2^14 of the fp16 code reading (`_e2m1_pair`)
        u = tl.sum(acc_u, 1) * 16384.0
        if HAS_LIMIT:
            u = tl.minimum(tl.maximum(u, -limit), limit)
            g = tl.minimum(g, limit)
        rw = tl.load(rw_ptr + p).to(tl.float32)
        h = g / (1.0 + tl.exp(-g)) * u * rw
        tl.store(h_ptr + p.to(tl.int64) * stride_hm + rn, h.to(h_ptr.dtype.element_ty), mask=n_ok)


@launchable
@triton.jit
def _fp4_down_gemv_kernel(h_ptr, w2_ptr, s2_ptr, idx_ptr, out_ptr, D, I, E,
                          stride_hm, stride_we, stride_wn, stride_se, stride_sn, stride_om,
                          BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr = False):
    """out[p, n-tile] = W2[e] h[p] for pair p; pairs of another device's expert get zeros (the output
    needs no zero fill)."""
    pdl_start(PDL)
    p, pid_n = tl.program_id(0), tl.program_id(1)
    NB: tl.constexpr = BK // 32
    e = tl.load(idx_ptr + p).to(tl.int64)
    r = p.to(tl.int64)
    rn = pid_n * BN + tl.arange(0, BN)
    n_ok = rn < D
    if (e >= 0) & (e < E):
        jb = tl.arange(0, NB)
        t = tl.arange(0, 16)
        acc = tl.full((BN, NB), 0.0, tl.float32)
        w_off = e * stride_we + rn[:, None, None] * stride_wn
        s_off = e * stride_se + rn[:, None] * stride_sn
        hrow = h_ptr + r * stride_hm
        for k0 in range(0, I, BK):
            kx = k0 + 32 * jb[:, None] + 2 * t[None, :]
            acc = _gemv_tile(w2_ptr, s2_ptr, w_off, s_off, hrow, kx, k0, I, n_ok, jb, t, acc, BN, NB)
        out = tl.sum(acc, 1) * 16384.0
        tl.store(out_ptr + r * stride_om + rn, out.to(out_ptr.dtype.element_ty), mask=n_ok)
    else:
        tl.store(out_ptr + r * stride_om + rn, tl.zeros([BN], tl.float32).to(out_ptr.dtype.element_ty), mask=n_ok)


MAG_BITS = tl.constexpr(0x0E000E00)      # bits 9-11 of each 16-bit half: an fp16's low exponent and top mantissa bits
SIGN_BITS = tl.constexpr(-2147450880)    # 0x80008000 as an int32: the sign bit of each 16-bit half
PAIR_BITS = tl.constexpr(-1912566272)    # 0x8E008E00 as an int32: MAG_BITS | SIGN_BITS


@triton.jit
def _e2m1_word_pair(w, I: tl.constexpr, REP: tl.constexpr = False):
    """int32 words of 8 e2m1 codes (elements 8j..8j+7 of a row, element 8j in the lowest nibble) ->
    elements 8j+I and 8j+I+4 (I in 0..3), fp32, times 2^-14. Two codes per integer operation: nibble I
    of each 16-bit half is moved to the fp16 place of `_e2m1_pair` (magnitude bits 9-11, sign bit 15)
    by one shift and mask of the whole word for each field, so the word's halves are two fp16 codes."""
    p = _word_pair_bits(w, I, REP)
    lo = p.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = (p >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _x_tile(x_ptr, xk, xm):
    """The x values of the word tiles' blocks: [NB, 4, 8], the 8 values of word j of block kb at
    [kb, j] (`xk` [NB, 4]: each word's first x offset; `xm`: the words inside the row)."""
    return tl.load(x_ptr + xk[:, :, None] + tl.arange(0, 8)[None, None, :], mask=xm[:, :, None], other=0.0)


@triton.jit
def _word_block_sums(wa, wb, xb, TWO: tl.constexpr, REP: tl.constexpr = False):
    """Σ over each 32-value block of code · x for the word tiles wa (and wb when TWO) [NB, BN, 4] (a
    block's 4 words in one thread) -> [NB, BN] each, times 2^-14. `xb` is `_x_tile` of the blocks: x is
    read once for both tiles and for all the rows a thread holds."""
    sa = tl.full(wa.shape, 0.0, tl.float32)
    sb = tl.full(wa.shape, 0.0, tl.float32)
    NB: tl.constexpr = wa.shape[0]
    xb = tl.reshape(xb.to(tl.float32), (NB, 4, 2, 2, 2))          # element 8j + 4h + 2a + b at [:, j, h, a, b]
    xb0, xb1 = tl.split(xb)
    xs = (tl.split(xb0), tl.split(xb1))                           # xs[b][a]: [NB, 4, 2] over h
    for i in tl.static_range(4):
        xl, xh = tl.split(xs[i % 2][i // 2])
        xl = xl[:, None, :]                                       # [NB, 1, 4]: element 8j + i
        xh = xh[:, None, :]                                       # element 8j + i + 4
        lo, hi = _e2m1_word_pair(wa, i, REP)
        sa = sa + lo * xl                                  # one FMA per code (a chain, not a sum of products)
        sa = sa + hi * xh
        if TWO:
            lo, hi = _e2m1_word_pair(wb, i, REP)
            sb = sb + lo * xl
            sb = sb + hi * xh
    return tl.sum(sa, 2), tl.sum(sb, 2)


@triton.jit
def _word_pair_bits(w, I: tl.constexpr, REP: tl.constexpr = False):
    """`_e2m1_word_pair` left packed: int32 words whose low and high fp16 are elements 8j+I and 8j+I+4
    (times 2^-14), as `half2` takes them. REP: the words are in the decode layout of `repack_words`,
    where pair I is (w << 6), (w << 9), (w ^ (w >>> 3)), (w ^ (w << 2)) masked: two operations a pair."""
    if REP:
        if I == 0:
            p = (w << 6) & PAIR_BITS
        elif I == 1:
            p = (w << 9) & PAIR_BITS
        elif I == 2:
            p = (w ^ (w.to(tl.uint32, bitcast=True) >> 3).to(tl.int32, bitcast=True)) & PAIR_BITS
        else:
            p = (w ^ (w << 2)) & PAIR_BITS
    elif I == 3:
        p = ((w >> 3) & MAG_BITS) | (w & SIGN_BITS)
    else:
        p = ((w << (9 - 4 * I)) & MAG_BITS) | ((w << (12 - 4 * I)) & SIGN_BITS)
    return p


@triton.jit
def _word_block_sums_half(wa, wb, xb, xs, TWO: tl.constexpr, ASM: tl.constexpr, REP: tl.constexpr = False):
    """`_word_block_sums` in packed fp16 (`half2`): x·xs in fp16 pairs (elements 8j+i, 8j+i+4), one
    `fma.rn.f16x2` per two codes, a block's 32 products summed in fp16 (|x·xs| < 2^14, so each product
    is below 6 and a block's half sum below 96), then in fp32. -> [NB, BN] each, times 2^-14 / xs."""
    NB: tl.constexpr = wa.shape[0]
    xb = tl.reshape(xb.to(tl.float32) * xs, (NB, 4, 2, 2, 2))      # element 8j + 4h + 2a + b at [:, j, h, a, b]
    xb0, xb1 = tl.split(xb)
    xq = (tl.split(xb0), tl.split(xb1))                            # xq[b][a]: [NB, 4, 2] over h
    sa = tl.full(wa.shape, 0, tl.int32)                            # fp16 pairs, +0.0
    sb = tl.full(wa.shape, 0, tl.int32)
    for i in tl.static_range(4):
        xl, xh = tl.split(xq[i % 2][i // 2])                       # [NB, 4]: elements 8j + i and 8j + i + 4
        xp = half2.pair_f16(xl, xh, ASM)[:, None, :]               # [NB, 1, 4]
        sa = half2.hfma2(_word_pair_bits(wa, i, REP), xp, sa, ASM)
        if TWO:
            sb = half2.hfma2(_word_pair_bits(wb, i, REP), xp, sb, ASM)
    a = _words_sum(sa, ASM)
    if TWO:
        return a, _words_sum(sb, ASM)
    else:
        return a, a                                                # (the down projection: one matrix)


@triton.jit
def _words_sum(s, ASM: tl.constexpr):
    """[NB, BN, 4] fp16 pairs -> [NB, BN] fp32: the 4 words of a block added in fp16, then the halves."""
    NB: tl.constexpr = s.shape[0]
    BN: tl.constexpr = s.shape[1]
    s0, s1 = tl.split(tl.reshape(s, (NB, BN, 2, 2)))
    s = half2.hadd2(s0, s1, ASM)
    s0, s1 = tl.split(s)
    return half2.sum_f32(half2.hadd2(s0, s1, ASM))


@triton.jit
def _row_amax(x_ptr, n, BLOCK: tl.constexpr):
    """max |x[0:n]| in fp32 (a row of activations, read in blocks)."""
    r = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], 0.0, tl.float32)
    for k0 in range(0, n, BLOCK):
        v = tl.load(x_ptr + k0 + r, mask=k0 + r < n, other=0.0).to(tl.float32)
        m = tl.maximum(m, tl.abs(v))
    return tl.max(m, 0)


@triton.jit
def _words_tile(w_ptr, w_off, kb, n_ok, b_ok, j):
    """The words of blocks kb [NB] of the BN rows at w_off [1, BN, 1] -> int32 [NB, BN, 4] (blocks first:
    the lanes of a warp take consecutive blocks and a thread the same block of BN / warps rows, so that
    it reads the block's x once for all of them)."""
    mask = b_ok[:, None, None] & n_ok[None, :, None] & (j >= 0)[None, None, :]
    return tl.load(w_ptr + w_off + 4 * kb[:, None, None] + j[None, None, :], mask=mask, other=0)


@triton.jit
def _scales_tile(s_ptr, s_off, kb, n_ok, b_ok):
    """e8m0 scales of blocks kb [NB] of the rows at s_off [1, BN] -> fp32 [NB, BN]."""
    s = tl.load(s_ptr + s_off + kb[:, None], mask=b_ok[:, None] & n_ok[None, :], other=127)
    return e8m0_to_fp32(s.to(tl.int32))


@triton.jit
def _block_tiles(w_ptr, s_ptr, w_off, s_off, K, n_ok, kb, j):
    """(words [NB, BN, 4], fp32 scales [NB, BN]) of blocks kb [NB] (`_words_tile`, `_scales_tile`);
    blocks at or past K // 32 read nothing."""
    b_ok = 32 * kb < K
    return _words_tile(w_ptr, w_off, kb, n_ok, b_ok, j), _scales_tile(s_ptr, s_off, kb, n_ok, b_ok)


@triton.jit
def _x_blocks(x_ptr, K, kb, j):
    """`_x_tile` of blocks kb [NB] of a row of K values."""
    return _x_tile(x_ptr, 32 * kb[:, None] + 8 * j[None, :], (32 * kb < K)[:, None] & (j >= 0)[None, :])


@triton.jit
def _down_words_acc(acc, w2_ptr, s2_ptr, hrow, w_off, s_off, I, n_ok, jb, j, hs, w2, sc, xb, BK: tl.constexpr,
                    HALF: tl.constexpr, ASM: tl.constexpr, PIPE: tl.constexpr, REP: tl.constexpr = False):
    """acc [NB, BN] + the scaled block sums of W2's rows at w_off (int32 words) with the pair's h row
    over the I columns: the K loop of both down-projection word kernels (HALF: in packed fp16 with h
    scaled by hs, `_word_block_sums_half`). PIPE: (w2, sc, xb) are the first blocks' tiles, loaded by
    the caller, and each step loads the next step's tiles before it computes (`_fp4_up_words_kernel`);
    otherwise those three are unused and each step loads its own."""
    NB: tl.constexpr = BK // 32
    for k0 in range(0, I, BK):
        kb = k0 // 32 + jb
        if PIPE:
            w2n, scn = _block_tiles(w2_ptr, s2_ptr, w_off, s_off, I, n_ok, kb + NB, j)
            xbn = _x_blocks(hrow, I, kb + NB, j)
            wc, scc, xbc = w2, sc, xb
        else:
            wc, scc = _block_tiles(w2_ptr, s2_ptr, w_off, s_off, I, n_ok, kb, j)
            xbc = _x_blocks(hrow, I, kb, j)
        if HALF:
            part, _ = _word_block_sums_half(wc, wc, xbc, hs, False, ASM, REP)
        else:
            part, _ = _word_block_sums(wc, wc, xbc, False, REP)
        acc += part * scc
        if PIPE:
            w2, sc, xb = w2n, scn, xbn
    return acc


@launchable
@triton.jit
def _fp4_up_words_kernel(x_ptr, w1_ptr, s1_ptr, w3_ptr, s3_ptr, rw_ptr, idx_ptr, h_ptr,
                         D, I, TOPK, E, limit,
                         stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_hm,
                         HAS_LIMIT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HALF: tl.constexpr = False,
                         ASM: tl.constexpr = False, PIPE: tl.constexpr = False, AMAX_BLOCK: tl.constexpr = 512,
                         REP: tl.constexpr = False, PDL: tl.constexpr = False):
    """`_fp4_up_gemv_kernel` on int32 words: a thread loads a block's 16 bytes as 4 words and decodes
    two codes per integer operation (`_e2m1_word_pair`); w1 and w3 share the reads of x. The strides
    of w1 and w3 count words (4 bytes). HALF: the products in packed fp16 (`_word_block_sums_half`),
    x scaled by a power of two from its row's max |x|."""
    pdl_start(PDL)
    p, pid_n = tl.program_id(0), tl.program_id(1)
    NB: tl.constexpr = BK // 32
    e = tl.load(idx_ptr + p).to(tl.int64)
    if (e >= 0) & (e < E):
        tok = (p // TOPK).to(tl.int64)
        rn = pid_n * BN + tl.arange(0, BN)
        n_ok = rn < I
        jb = tl.arange(0, NB)
        j = tl.arange(0, 4)
        acc_g = tl.full((NB, BN), 0.0, tl.float32)
        acc_u = tl.full((NB, BN), 0.0, tl.float32)
        w_off = e * stride_we + rn[None, :, None] * stride_wn
        s_off = e * stride_se + rn[None, :] * stride_sn
        xrow = x_ptr + tok * stride_xm
        if PIPE:                                  # the first blocks' loads go out before the row's max is read
            w1, sc1 = _block_tiles(w1_ptr, s1_ptr, w_off, s_off, D, n_ok, jb, j)
            w3, sc3 = _block_tiles(w3_ptr, s3_ptr, w_off, s_off, D, n_ok, jb, j)
            xb = _x_blocks(xrow, D, jb, j)
        xs, back = 1.0, 16384.0                   # the 2^14 of the fp16 code reading
        if HALF:
            xs, inv = half2.x_scale(_row_amax(xrow, D, AMAX_BLOCK), 14)
            back = 16384.0 * inv
        for k0 in range(0, D, BK):
            kb = k0 // 32 + jb                                                    # [NB] block numbers
            if PIPE:                              # the next step's tiles, in flight while this step computes
                w1n, sc1n = _block_tiles(w1_ptr, s1_ptr, w_off, s_off, D, n_ok, kb + NB, j)
                w3n, sc3n = _block_tiles(w3_ptr, s3_ptr, w_off, s_off, D, n_ok, kb + NB, j)
                xbn = _x_blocks(xrow, D, kb + NB, j)
            else:
                w1, sc1 = _block_tiles(w1_ptr, s1_ptr, w_off, s_off, D, n_ok, kb, j)
                w3, sc3 = _block_tiles(w3_ptr, s3_ptr, w_off, s_off, D, n_ok, kb, j)
                xb = _x_blocks(xrow, D, kb, j)
            if HALF:
                g, u = _word_block_sums_half(w1, w3, xb, xs, True, ASM, REP)
            else:
                g, u = _word_block_sums(w1, w3, xb, True, REP)
            acc_g += g * sc1
            acc_u += u * sc3
            if PIPE:
                w1, sc1, w3, sc3, xb = w1n, sc1n, w3n, sc3n, xbn
        g = tl.sum(acc_g, 0) * back
        u = tl.sum(acc_u, 0) * back
        if HAS_LIMIT:
            u = tl.minimum(tl.maximum(u, -limit), limit)
            g = tl.minimum(g, limit)
        rw = tl.load(rw_ptr + p).to(tl.float32)
        h = g / (1.0 + tl.exp(-g)) * u * rw
        tl.store(h_ptr + p.to(tl.int64) * stride_hm + rn, h.to(h_ptr.dtype.element_ty), mask=n_ok)


@launchable
@triton.jit
def _fp4_down_words_kernel(h_ptr, w2_ptr, s2_ptr, idx_ptr, out_ptr, D, I, E,
                           stride_hm, stride_we, stride_wn, stride_se, stride_sn, stride_om,
                           BN: tl.constexpr, BK: tl.constexpr, HALF: tl.constexpr = False,
                           ASM: tl.constexpr = False, PIPE: tl.constexpr = False, AMAX_BLOCK: tl.constexpr = 512,
                           REP: tl.constexpr = False, PDL: tl.constexpr = False):
    """`_fp4_down_gemv_kernel` on int32 words (as `_fp4_up_words_kernel`); the strides of w2 count words."""
    pdl_start(PDL)
    p, pid_n = tl.program_id(0), tl.program_id(1)
    NB: tl.constexpr = BK // 32
    e = tl.load(idx_ptr + p).to(tl.int64)
    r = p.to(tl.int64)
    rn = pid_n * BN + tl.arange(0, BN)
    n_ok = rn < D
    if (e >= 0) & (e < E):
        jb = tl.arange(0, NB)
        j = tl.arange(0, 4)
        acc = tl.full((NB, BN), 0.0, tl.float32)
        w_off = e * stride_we + rn[None, :, None] * stride_wn
        s_off = e * stride_se + rn[None, :] * stride_sn
        hrow = h_ptr + r * stride_hm
        w2, sc, xb = 0, 0.0, 0.0
        if PIPE:                                  # the first blocks' loads go out before the row's max is read
            w2, sc = _block_tiles(w2_ptr, s2_ptr, w_off, s_off, I, n_ok, jb, j)
            xb = _x_blocks(hrow, I, jb, j)
        hs, back = 1.0, 16384.0
        if HALF:
            hs, inv = half2.x_scale(_row_amax(hrow, I, AMAX_BLOCK), 14)
            back = 16384.0 * inv
        acc = _down_words_acc(acc, w2_ptr, s2_ptr, hrow, w_off, s_off, I, n_ok, jb, j, hs, w2, sc, xb, BK, HALF,
                              ASM, PIPE, REP)
        out = tl.sum(acc, 0) * back
        tl.store(out_ptr + r * stride_om + rn, out.to(out_ptr.dtype.element_ty), mask=n_ok)
    else:
        tl.store(out_ptr + r * stride_om + rn, tl.zeros([BN], tl.float32).to(out_ptr.dtype.element_ty), mask=n_ok)


@launchable
@triton.jit
def _fp4_down_words_tok_kernel(h_ptr, w2_ptr, s2_ptr, idx_ptr, out_ptr, D, I, E, TOPK,
                               stride_hm, stride_we, stride_wn, stride_se, stride_sn, stride_om,
                               BN: tl.constexpr, BK: tl.constexpr, HALF: tl.constexpr = False,
                               ASM: tl.constexpr = False, PIPE: tl.constexpr = False,
                               AMAX_BLOCK: tl.constexpr = 512, REP: tl.constexpr = False, PDL: tl.constexpr = False):
    """`_fp4_down_words_kernel` with a token's TOPK pairs summed in the program: out[t, n-tile] =
    Σ_k W2[e_tk] h[t·TOPK + k] in fp32, stored once (no [N·K, D] pair outputs, no zero fill, no sum
    kernel); pairs of another device's expert add nothing. HALF: each pair's h scaled on its own."""
    pdl_start(PDL)
    n, pid_n = tl.program_id(0).to(tl.int64), tl.program_id(1)
    NB: tl.constexpr = BK // 32
    rn = pid_n * BN + tl.arange(0, BN)
    n_ok = rn < D
    jb = tl.arange(0, NB)
    j = tl.arange(0, 4)
    acc = tl.full((NB, BN), 0.0, tl.float32)
    for kk in range(0, TOPK):
        p = n * TOPK + kk
        e = tl.load(idx_ptr + p).to(tl.int64)
        if (e >= 0) & (e < E):
            w_off = e * stride_we + rn[None, :, None] * stride_wn
            s_off = e * stride_se + rn[None, :] * stride_sn
            hrow = h_ptr + p * stride_hm
            w2, sc, xb = 0, 0.0, 0.0
            if PIPE:
                w2, sc = _block_tiles(w2_ptr, s2_ptr, w_off, s_off, I, n_ok, jb, j)
                xb = _x_blocks(hrow, I, jb, j)
            if HALF:
                hs, inv = half2.x_scale(_row_amax(hrow, I, AMAX_BLOCK), 14)
                part = _down_words_acc(tl.full((NB, BN), 0.0, tl.float32), w2_ptr, s2_ptr, hrow, w_off, s_off,
                                       I, n_ok, jb, j, hs, w2, sc, xb, BK, HALF, ASM, PIPE, REP)
                acc += part * inv
            else:
                acc = _down_words_acc(acc, w2_ptr, s2_ptr, hrow, w_off, s_off, I, n_ok, jb, j, 1.0, w2, sc, xb, BK,
                                      HALF, ASM, PIPE, REP)
    out = tl.sum(acc, 0) * 16384.0
    tl.store(out_ptr + n * stride_om + rn, out.to(out_ptr.dtype.element_ty), mask=n_ok)


@launchable
@triton.jit
def _fp4_dequant_kernel(w_ptr, s_ptr, out_ptr, n_bytes, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """Packed e2m1 bytes (rows of K/2 bytes, K a multiple of 32) and their e8m0 1x32 scales -> the
    K values per row in the output dtype, low nibble first: out[2b] and out[2b + 1] from byte b, whose
    scale is number b // 16 (16 bytes hold one 32-value block)."""
    pdl_start(PDL)
    b = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = b < n_bytes
    even, odd = _fp4_tile(w_ptr + b, s_ptr + b // 16, ok)
    tl.store(out_ptr + 2 * b, even.to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(out_ptr + 2 * b + 1, odd.to(out_ptr.dtype.element_ty), mask=ok)


def dequant_fp4(w: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Packed FP4 int8 [..., R, K/2] with e8m0 scales [..., R, K/32] -> [..., R, K] in `dtype` (exact in
    bf16). Twin: `dsv4.ops.dequant_fp4_rows`."""
    w, su = w.contiguous(), s.contiguous().view(torch.uint8)
    out = torch.empty(*w.shape[:-1], 2 * w.shape[-1], dtype=dtype, device=w.device)
    n = w.numel()
    block = 256 if INTERPRET else 1024
    _fp4_dequant_kernel[(cdiv(n, block),)](w, su, out, n, BLOCK=block, **pdl(w))
    return out


@launchable
@triton.jit
def _pair_sum_kernel(src_ptr, out_ptr, D, K: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """out[n, c] = Σ_k src[n·K + k, c] in fp32, rounded once to out's dtype: a token's K pair outputs."""
    pdl_start(PDL)
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = c < D
    acc = tl.full([BLOCK], 0.0, tl.float32)
    for k in tl.static_range(K):
        acc += tl.load(src_ptr + (n * K + k) * D + c, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + n * D + c, acc.to(out_ptr.dtype.element_ty), mask=ok)


def _pair_sum(pairs: torch.Tensor, N: int, K: int, D: int) -> torch.Tensor:
    """[N·K, D] pair outputs -> [N, D] per-token sums: one launch (a strided torch reduction over K took
    5 us at V4-Flash's decode shape on an H200)."""
    out = torch.empty(N, D, dtype=pairs.dtype, device=pairs.device)
    if N == 0:
        return out
    block = 256 if INTERPRET else 1024
    _pair_sum_kernel[(N, cdiv(D, block))](pairs, out, D, K=K, BLOCK=block, **pdl(pairs))
    return out


# ----------------------------------------------------------------------------- decode layout
# The word kernels place two codes of a word (elements 8j+I and 8j+I+4) as the two halves of an fp16 pair
# (magnitude bits at 9-11 of each half, sign at 15). In the released layout (code k in nibble k) a sign
# sits 4 bits above its magnitude but must land 6 above: two shifts and two masks a pair (15 operations
# a word). `repack_words` mixes each word's 32 bits (a linear map over GF(2), invertible) so that pair I
# is one shift or two of the word, XORed and masked (`_word_pair_bits` with REP): 8 operations a word,
# the fewest of any layout of this form (`bench/search_fp4_decode_layout.py`: none with 3 shifts). Same size,
# same values: an experiment for `bench/probe_flash_decode.py` until timed, not the resident layout.
REPACK_SHIFTS = ((6,), (9,), (0, -3), (0, 2))      # pair I = XOR of the word shifted by these (<0: >>>), masked


def _repack_sources() -> tuple[tuple[int, ...], ...]:
    """For each bit q of a repacked word: the bits of the released word whose XOR it is."""
    pos = [9, 10, 11, 15, 25, 26, 27, 31]                # a pair's target bits (m, e0, e1, s of lo, then hi)
    rows, srcs = [], []
    for i, shifts in enumerate(REPACK_SHIFTS):
        for p in pos:
            rows.append(sum(1 << (p - s) for s in shifts if 0 <= p - s < 32))       # repacked bits XORed there
            half = p >= 16
            srcs.append(4 * (i + 4 * half) + {9: 0, 10: 1, 11: 2, 15: 3}[p - 16 * half])
    # invert the 32 x 32 map over GF(2): row t of aug says which targets XOR to repacked bit t once reduced
    aug = [[(rows[t] >> q) & 1 for q in range(32)] + [int(k == t) for k in range(32)] for t in range(32)]
    for col in range(32):
        piv = next(r for r in range(col, 32) if aug[r][col])
        aug[col], aug[piv] = aug[piv], aug[col]
        for r in range(32):
            if r != col and aug[r][col]:
                aug[r] = [a ^ b for a, b in zip(aug[r], aug[col])]
    return tuple(tuple(srcs[t] for t in range(32) if aug[q][32 + t]) for q in range(32))


REPACK_SOURCES = _repack_sources()


def repack_words(w: torch.Tensor) -> torch.Tensor:
    """Packed FP4 codes (int8 [..., n], n a multiple of 4, two codes a byte, low nibble first) -> the
    same shape in the word kernels' decode layout (`REPACK_SHIFTS`), one leading slice at a time."""
    if w.dtype != torch.int8 or w.shape[-1] % 4:
        raise ValueError(f"repack_words takes int8 codes with a last dim divisible by 4; got {w.dtype} "
                         f"{tuple(w.shape)}")
    w = w.contiguous()
    out = torch.empty_like(w)
    if w.numel() == 0:
        return out
    rows = max(1, (32 << 20) // w.shape[-1])                          # ~32 MB of codes a slice
    for src, dst in zip(w.reshape(-1, w.shape[-1]).split(rows), out.view(-1, w.shape[-1]).split(rows)):
        u = src.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        r = torch.zeros_like(u)
        for q, bits in enumerate(REPACK_SOURCES):
            b = torch.zeros_like(u)
            for k in bits:
                b ^= (u >> k) & 1
            r |= b << q
        dst.view(torch.int32).copy_(torch.where(r >= 1 << 31, r - (1 << 32), r))
    return out


# ----------------------------------------------------------------------------- launch
def _align(idx: torch.Tensor, n_experts: int, bm: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs sorted by expert, each expert's run padded to whole blocks of bm rows, on the device.

    Returns row_map [B·bm] (pair id or −1), block_expert [B] (expert or −1) and the used block count
    [1], where B = NK // bm + min(E, NK) + 1 bounds the blocks from the shapes alone."""
    E = n_experts
    flat = idx.reshape(-1)
    NK = flat.numel()
    key = torch.where((flat >= 0) & (flat < E), flat, E)                      # foreign experts: sorted last
    _, order = torch.sort(key, stable=True)                                   # [NK] pairs by expert
    counts = torch.zeros(E + 1, dtype=torch.long, device=idx.device).scatter_add_(
        0, key, torch.ones_like(key))[:E]                                      # [E]
    blocks = (counts + bm - 1) // bm                                          # [E]
    block_end = torch.cumsum(blocks, 0)                                       # [E]
    pair_start = torch.cumsum(counts, 0) - counts                             # [E] first sorted pair
    B = NK // bm + min(E, NK) + 1
    expert = torch.searchsorted(block_end, torch.arange(B, device=idx.device), right=True)   # [B] in [0, E]
    used = expert < E
    block_expert = torch.where(used, expert, -1).to(torch.int32)
    r = torch.arange(B * bm, device=idx.device)
    e = expert.clamp(max=E - 1).repeat_interleave(bm)                         # [B·bm]
    j = r - (block_end[e] - blocks[e]) * bm                                   # row within the expert's run
    ok = used.repeat_interleave(bm) & (j < counts[e])
    row_map = torch.where(ok, order[(pair_start[e] + j).clamp(0, max(NK - 1, 0))], -1).to(torch.int32)
    return row_map, block_expert, block_end[-1:].to(torch.int32)


# launch configurations; `TILES` may be replaced (bench/probe_quant_kernels.py tries variants)
TILES = {"gemv": dict(BN=4, BK=512, num_warps=4, num_stages=2),   # fastest of 8 variants, H200
         "words": dict(BN=16, BK=512, num_warps=4, num_stages=2)}   # 96 registers (up), 10.2 SASS per byte
# the decode GEMV: "words" (`_fp4_up_words_kernel`, two codes per integer operation) or "bytes"
# (`_fp4_up_gemv_kernel`, a byte per thread operation); `bench/probe_flash_decode.py` times both
DECODE_KERNEL = "words"
# the words path's down projection: "pair" (`_fp4_down_words_kernel`, one program per pair and row tile,
# pair outputs summed afterwards) or "token" (`_fp4_down_words_tok_kernel`, a token's pairs summed in the
# program: no zero fill and no sum kernel, but K times fewer programs; V4-Flash on an H200, 6 experts at
# batch 1: 50.2 us with "pair" against 51.4-57.7 us over five tiles of "token", bench/probe_flash_decode.py)
WORDS_DOWN = "pair"
# the words kernels' arithmetic for bf16/fp16 activations: "half" (packed fp16 products, `half2`: about
# half the instructions per weight byte) or "fp32"; fp32 activations always take "fp32"
WORDS_MATH = "half"
# the words kernels' K loop loads the next step's words, scales and x before it computes the current
# step's (registers double-buffered by hand: Triton's pipeliner leaves these loads in the step that uses
# them, so each step waits for its loads and the grid of about one wave computes in lockstep with them);
# the first step's loads go out before the row's max |x| is read. The same arithmetic either way. Off: on
# an H200 it gains nothing at the default tiles (V4-Flash's 6 experts of a token 37.6 against 37.2 us; in
# the model 0.1455 against 0.1430 ms a layer); it pays with the repacked words at 32 x 256 tiles (32.5 us)
WORDS_PIPE = False
# the row max |x| of the packed fp16 arithmetic is read in blocks of up to this many values (one block
# for rows of V4-Flash's D = 4096 and I = 2048); None: blocks of BK, as the K loop reads. The same values
# either way; H200, V4-Flash's 6 experts at batch 1 from HBM (`bench/probe_flash_decode.py --only fp4loop`):
# up + down 37.2 against 37.7 us at the default tiles, 39.7-43.7 against 40.5-45.2 at three others
WORDS_AMAX_BLOCK = 4096


def _amax_block(n: int, cfg: dict) -> int:
    """The block of the words kernels' row max over n values (`WORDS_AMAX_BLOCK`)."""
    if WORDS_AMAX_BLOCK is None:
        return cfg["BK"]
    b = WORDS_AMAX_BLOCK
    if not isinstance(b, int) or b < 32 or b & (b - 1):
        raise ValueError(f"fp4_moe.WORDS_AMAX_BLOCK must be None or a power of two >= 32; got {b!r}")
    return min(next_pow2(n), b)


def _path(n_pairs: int, n_experts: int) -> str:
    """'gemv' while pairs do not outnumber experts (each expert's rows read about once), else 'dot'."""
    return "gemv" if n_pairs <= n_experts else "dot"


def _tiles(pairs_per_expert: float) -> tuple[int, dict]:
    if INTERPRET:
        return 16, dict(BN=32, BK=32, num_warps=4, num_stages=1)
    # K tiles of 64: with 128 the gate/up kernel spills registers on sm90 (116 B at BM 16, 252 B at BM 32;
    # ptxas, with the divisibility the JIT gives V4-Flash's shapes); with 64 it uses 137 and 168
    if pairs_per_expert <= 16:   # decode-sized: a few pairs per expert
        return 16, dict(BN=64, BK=64, num_warps=4, num_stages=3)
    if pairs_per_expert <= 64:
        return 32, dict(BN=64, BK=64, num_warps=4, num_stages=3)
    return 64, dict(BN=128, BK=64, num_warps=8, num_stages=3)


def _check(x, idx, weight, w1, s1, w2, s2, w3, s3) -> None:
    E, I, half = w1.shape
    D = x.shape[-1]
    if x.dim() != 2 or idx.dim() != 2 or weight.shape != idx.shape:
        raise ValueError(f"x must be [N, D], idx and weight [N, K]; got {tuple(x.shape)}, {tuple(idx.shape)}, "
                         f"{tuple(weight.shape)}")
    shapes = {"w1": (w1, (E, I, D // 2)), "w3": (w3, (E, I, D // 2)), "w2": (w2, (E, D, I // 2)),
              "s1": (s1, (E, I, D // 32)), "s3": (s3, (E, I, D // 32)), "s2": (s2, (E, D, I // 32))}
    for name, (t, want) in shapes.items():
        packed = name.startswith("w")
        if tuple(t.shape) != want or t.dtype != (torch.int8 if packed else torch.float8_e8m0fnu):
            raise ValueError(f"{name} must be {'int8 (two e2m1 codes per byte)' if packed else 'float8_e8m0fnu'} "
                             f"of shape {want} for x [N, {D}] and {E} experts of width {I}; got {t.dtype} "
                             f"{tuple(t.shape)}")
    if D % 32 or I % 32 or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"the Triton FP4 experts need D and I multiples of 32 and bf16/fp16/fp32 activations; "
                         f"got D={D}, I={I}, {x.dtype}")


def _fp4_moe(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, w1: torch.Tensor, s1: torch.Tensor,
             w2: torch.Tensor, s2: torch.Tensor, w3: torch.Tensor, s3: torch.Tensor, limit: float,
             path: str | None = None, repacked: bool = False) -> torch.Tensor:
    """`repacked`: w1, w2, w3 are in `repack_words`' layout (the word kernels only)."""
    N, K = idx.shape
    E, I, _ = w1.shape
    D = x.shape[1]
    NK = N * K
    if DECODE_KERNEL not in ("words", "bytes") or WORDS_DOWN not in ("pair", "token"):
        raise ValueError(f"fp4_moe.DECODE_KERNEL must be 'words' or 'bytes' and fp4_moe.WORDS_DOWN 'pair' or "
                         f"'token'; got {DECODE_KERNEL!r} and {WORDS_DOWN!r}")
    path = path or _path(NK, E)
    words = path == "gemv" and DECODE_KERNEL == "words" or path == "words"
    if repacked and not words:
        raise ValueError(f"repacked FP4 words are read by the word kernels only, not by path {path!r}")
    if words and WORDS_DOWN == "token" and NK:
        out = torch.empty(N, D, dtype=x.dtype, device=x.device)               # [N, D]: pairs summed in the kernel
    elif path == "gemv" or words:                                             # [N·K, D] pairs, every row written
        out = torch.empty(NK, D, dtype=x.dtype, device=x.device)
    else:
        out = torch.zeros(NK, D, dtype=x.dtype, device=x.device)              # (rows of absent experts stay 0)
    if NK == 0:
        return out.view(N, K, D).sum(1)
    x = x.contiguous()
    h = torch.empty(NK, I, dtype=x.dtype, device=x.device)                    # [N·K, I]
    rw = weight.reshape(-1).float().contiguous()                              # [N·K]
    s1u, s2u, s3u = (s.contiguous().view(torch.uint8) for s in (s1, s2, s3))
    w1, w2, w3 = (w.contiguous() for w in (w1, w2, w3))
    if words:
        if WORDS_MATH not in ("half", "fp32"):
            raise ValueError(f"fp4_moe.WORDS_MATH must be 'half' or 'fp32'; got {WORDS_MATH!r}")
        cfg = dict(BN=16, BK=64, num_warps=4, num_stages=1) if INTERPRET else TILES["words"]
        half = dict(HALF=WORDS_MATH == "half" and x.dtype != torch.float32, ASM=not INTERPRET, PIPE=bool(WORDS_PIPE),
                    REP=bool(repacked))
        flat = idx.reshape(-1).contiguous()
        w1w, w2w, w3w = (w.view(torch.int32) for w in (w1, w2, w3))                # 4 bytes = 8 codes a word
        _fp4_up_words_kernel[(NK, cdiv(I, cfg["BN"]))](
            x, w1w, s1u, w3w, s3u, rw, flat, h, D, I, K, E, float(limit),
            x.stride(0), w1w.stride(0), w1w.stride(1), s1u.stride(0), s1u.stride(1), h.stride(0),
            HAS_LIMIT=limit > 0, AMAX_BLOCK=_amax_block(D, cfg), **half, **cfg, **pdl(x))
        if WORDS_DOWN == "token":
            down = TILES.get("words_down", cfg) if not INTERPRET else cfg
            _fp4_down_words_tok_kernel[(N, cdiv(D, down["BN"]))](
                h, w2w, s2u, flat, out, D, I, E, K, h.stride(0), w2w.stride(0), w2w.stride(1), s2u.stride(0),
                s2u.stride(1), out.stride(0), AMAX_BLOCK=_amax_block(I, down), **half, **down, **pdl(h))
            return out
        dcfg = cfg if INTERPRET else TILES.get("words_pair_down", cfg)       # (a probe may time its own)
        _fp4_down_words_kernel[(NK, cdiv(D, dcfg["BN"]))](
            h, w2w, s2u, flat, out, D, I, E, h.stride(0), w2w.stride(0), w2w.stride(1), s2u.stride(0),
            s2u.stride(1), out.stride(0), AMAX_BLOCK=_amax_block(I, dcfg), **half, **dcfg, **pdl(h))
        return _pair_sum(out, N, K, D)
    if path == "gemv":
        cfg = dict(BN=16, BK=64, num_warps=4, num_stages=1) if INTERPRET else TILES["gemv"]
        flat = idx.reshape(-1).contiguous()
        _fp4_up_gemv_kernel[(NK, cdiv(I, cfg["BN"]))](
            x, w1, s1u, w3, s3u, rw, flat, h, D, I, K, E, float(limit),
            x.stride(0), w1.stride(0), w1.stride(1), s1u.stride(0), s1u.stride(1), h.stride(0),
            HAS_LIMIT=limit > 0, **cfg, **pdl(x))
        _fp4_down_gemv_kernel[(NK, cdiv(D, cfg["BN"]))](
            h, w2, s2u, flat, out, D, I, E, h.stride(0), w2.stride(0), w2.stride(1), s2u.stride(0),
            s2u.stride(1), out.stride(0), **cfg, **pdl(h))
        return _pair_sum(out, N, K, D)
    bm, cfg = _tiles(NK / min(E, NK))
    row_map, block_expert, n_blocks = _align(idx, E, bm)
    B = block_expert.numel()
    dot32 = INTERPRET or x.dtype == torch.float32
    _fp4_up_kernel[(B, cdiv(I, cfg["BN"]))](
        x, w1, s1u, w3, s3u, rw, row_map, block_expert, h, D, I, K, n_blocks, float(limit),
        x.stride(0), w1.stride(0), w1.stride(1), s1u.stride(0), s1u.stride(1), h.stride(0),
        HAS_LIMIT=limit > 0, DOT_FP32=dot32, BM=bm, **cfg, **pdl(x))
    _fp4_down_kernel[(B, cdiv(D, cfg["BN"]))](
        h, w2, s2u, row_map, block_expert, out, D, I, n_blocks,
        h.stride(0), w2.stride(0), w2.stride(1), s2u.stride(0), s2u.stride(1), out.stride(0),
        DOT_FP32=dot32, BM=bm, **cfg, **pdl(h))
    return _pair_sum(out, N, K, D)                                           # [N, D], K outputs per token


@torch.library.custom_op("dsv4::fp4_moe", mutates_args=())
def _fp4_moe_op(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, w1: torch.Tensor, s1: torch.Tensor,
                w2: torch.Tensor, s2: torch.Tensor, w3: torch.Tensor, s3: torch.Tensor, limit: float) -> torch.Tensor:
    return _fp4_moe(x, idx, weight, w1, s1, w2, s2, w3, s3, limit)


@_fp4_moe_op.register_fake
def _(x, idx, weight, w1, s1, w2, s2, w3, s3, limit):
    return torch.empty_like(x)


def fp4_experts(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, w1: torch.Tensor, s1: torch.Tensor,
                w2: torch.Tensor, s2: torch.Tensor, w3: torch.Tensor, s3: torch.Tensor, limit: float) -> torch.Tensor:
    """Routed experts on FP4 weights: x [N, D], idx [N, K] (ids outside [0, E) contribute nothing), weight
    [N, K] routing weights; w1, w3 int8 [E, I, D/2], w2 int8 [E, D, I/2] (two e2m1 codes per byte, low
    nibble first); s1, s3 e8m0 [E, I, D/32], s2 e8m0 [E, D, I/32]. -> [N, D] in x's dtype.
    Twin: `dsv4.ops.fp4_experts_torch`."""
    _check(x, idx, weight, w1, s1, w2, s2, w3, s3)
    if torch.compiler.is_compiling():
        return _fp4_moe_op(x, idx, weight, w1, s1, w2, s2, w3, s3, float(limit))
    return _fp4_moe(x, idx, weight, w1, s1, w2, s2, w3, s3, float(limit))
