"""Block-scaled FP8 GEMM in Triton: y = x · (Wq ⊙ S)ᵀ with bf16 / fp16 / fp32 activations.

Spec: ARCHITECTURE.md §11.1. The weight Wq [N, K] is float8 e4m3 and S [⌈N/bn⌉, ⌈K/bk⌉] holds one
scale per bn×bk block (128×128 in the releases), e8m0 (a power of two) or fp32. The kernel reads the
weight bytes once, widens each tile to the activation dtype (exact: e4m3 ⊂ bf16 and fp16) and runs a
plain `tl.dot` with fp32 accumulation; every K tile lies inside one scale block, so the tile's
partial product is multiplied by its row-block scales before it is added (exact for power-of-two
scales). Activations are not quantised: the numerics are those of dequantise-then-matmul, the twin
`dsv4.ops.fp8_linear_torch`, up to summation order.

Portability: only `tl.dot` and integer/float arithmetic. e4m3 is decoded with integer operations on
GPUs before sm89 (and under the interpreter); sm89+ uses the native fp8 conversion. No TMA, no
wgmma-specific API, so it runs on A100, L40 and consumer GPUs as well as Hopper.

Decode-sized inputs (M <= `GEMV_MAX_ROWS` = 2 rows) take a GEMV instead, `_fp8_gemv_kernel`: one launch,
no `tl.dot`, no workspace, no atomics (deterministic). A 16-row dot tile wastes 14..15 of its rows and,
with a few thousand output rows, occupies too few SMs, so the tiled path splits K into an fp32
workspace summed afterwards (two or three launches). The GEMV spreads the work over N instead: each
program owns BN output rows (BN a power of two dividing the scale block's rows, so that the program's
rows share one row of scales) and loops over all of K in chunks of BK. A thread reads 16 contiguous
weight bytes at a time (one 16-byte load), decodes them, sums their 16 products with x in fp32 in its
registers and multiplies that partial sum by the run's block scale (so one scale multiply per 16
weights, exact for e8m0); each row of x has its own accumulator [BN, BK/16], reduced across K once
after the loop, and the weight tile is decoded once for all rows (up to `GEMV_ROWS` = 4 per launch).

Why 2 rows: per weight byte the GEMV spends a decode, one FMA per row of x and x's conversion, and an
H200 SM issues only ~8 instructions per byte it can stream from HBM (128 lanes per clock against ~16 B
per clock), so its cost grows with M while the dot tile's is flat up to 16 rows. Measured on an H200
(`bench/probe_fp8_gemv.py`, weights cycled through more than L2 holds): at M = 1 and 2 the GEMV beats
the tiled path on all four V4-Flash decode shapes (M = 1, default tiles: wq_a 1024x4096 3.5 against
9.2 us, wq_b 32768x1024 13.1 against 17.0, wkv 512x4096 2.9 against 9.1, wo_b 4096x8192 11.9 against
22.1; M = 2: 5.4, 15.7, 3.4, 16.1 against 9.1, 16.8, 8.8, 22.1); at M = 4 it still wins on the two
small matrices but loses on the two large ones (wq_b 29 against 17 us, wo_b 30 against 22, and no
variant did better than 27 and 28). `fp8_gemv` runs the GEMV at any M.

The default tiles (`_gemv_tiles`): BN the largest power of two (at most 32) with N / BN >= 6·SMs (6 to
12 programs per SM; fewer programs of more rows measured slower), BK filling a tile of 4096
weights (32 per thread at 4 warps) — V4-Flash wkv (512 x 4096) runs 512 one-row programs over the
whole of K, wo_b (4096 x 8192) 1024 programs of 4 rows in chunks of 1024 columns. `GEMV_VARIANTS`
lists other launch shapes, run through `fp8_gemv(..., **variant)` and timed by the same script.

Under `TRITON_INTERPRET=1` (CPU tests) the dot runs in fp32 (the interpreter's bf16 dot is wrong)
and each path has one small tile configuration. The kernels use only core `tl` builtins and `tl.sum`
(which runs in the interpreter: the GEMV tests use it), none of the other `@jit` helpers of
`triton.language.standard` (`tl.cdiv`, `tl.zeros`, `tl.sigmoid`): those are compiled-mode functions
when triton was imported before TRITON_INTERPRET was set (torch imports it), and fail in the interpreter.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from .launch import cdiv, launchable, next_pow2, pdl, pdl_start

INTERPRET = bool(triton.knobs.runtime.interpret)


# ----------------------------------------------------------------------------- format decoding (shared with fp4_moe)
@triton.jit
def e8m0_to_fp32(s):
    """e8m0 codes (int32, 0..254) -> 2^(s - 127) in fp32; code 0 is the subnormal 2^-127."""
    bits = tl.where(s == 0, 0x00400000, s << 23)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def fp32_to_e4m3(x):
    """fp32 values with |x| <= 448 -> e4m3fn codes (int32, 0..255), rounded to nearest even, with integer
    operations only (any GPU; the interpreter's fp8 cast does not carry a rounded mantissa into the
    exponent)."""
    bits = x.to(tl.int32, bitcast=True)
    a = tl.abs(x)
    ab = a.to(tl.int32, bitcast=True)
    r = ab + 0x7FFFF + ((ab >> 20) & 1)                      # round the mantissa to 3 bits, ties to even
    normal = ((((r >> 23) & 0xFF) - 120) << 3) | ((r >> 20) & 7)
    sub = ((a * 512.0 + 12582912.0) - 12582912.0).to(tl.int32)   # m · 2^-9, ties to even (1.5·2^23 trick)
    code = tl.where(a < 0.015625, sub, normal)
    return code | ((bits >> 24) & 0x80)


@triton.jit
def e4m3_to_fp32(b):
    """e4m3fn codes (int32, 0..255) -> fp32, exact, with integer operations only (any GPU)."""
    mag = b & 0x7F
    normal = ((mag << 20) + (120 << 23)).to(tl.float32, bitcast=True)   # exponent bias 7 -> 127
    sub = (mag & 7).to(tl.float32) * 0.001953125                         # subnormals: m · 2^-9
    v = tl.where((mag >> 3) == 0, sub, normal)
    return tl.where((b & 0x80) != 0, -v, v)


@launchable
@triton.jit
def _fp8_gemm_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, k_per_split,
                     stride_xm, stride_wn, stride_sn, stride_ym, stride_ys,
                     SBN: tl.constexpr, SBK: tl.constexpr, SCALE_E8M0: tl.constexpr, NATIVE_FP8: tl.constexpr,
                     DOT_FP32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     GROUP_M: tl.constexpr, PDL: tl.constexpr = False):
    pdl_start(PDL)
    pid, split = tl.program_id(0), tl.program_id(1)
    n_m, n_n = (M + BM - 1) // BM, (N + BN - 1) // BN
    group = pid // (GROUP_M * n_n)                    # row-block groups: neighbouring programs share W tiles
    first_m = group * GROUP_M
    size_m = min(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_n)) % size_m
    pid_n = (pid % (GROUP_M * n_n)) // size_m

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok, n_ok = rm < M, rn < N
    k_lo = split * k_per_split
    k_hi = min(K, k_lo + k_per_split)
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + (k_lo + rk)[None, :]     # int64: M·K may pass 2^31
    w_ptrs = w_ptr + rn[:, None] * stride_wn + (k_lo + rk)[None, :]
    s_ptrs = s_ptr + (rn // SBN) * stride_sn
    acc = tl.full((BM, BN), 0.0, tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        k_ok = (k0 + rk) < k_hi
        a = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wb = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0)
        if NATIVE_FP8:
            w = wb.to(tl.float8e4nv, bitcast=True)
        else:
            w = e4m3_to_fp32(wb.to(tl.int32))
        if SCALE_E8M0:
            s = e8m0_to_fp32(tl.load(s_ptrs + k0 // SBK, mask=n_ok, other=127).to(tl.int32))
        else:
            s = tl.load(s_ptrs + k0 // SBK, mask=n_ok, other=1.0)
        if DOT_FP32:
            part = tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            part = tl.dot(a, tl.trans(w.to(a.dtype)))
        acc += part * s[None, :]
        x_ptrs += BK
        w_ptrs += BK
    y_ptrs = y_ptr + split * stride_ys + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _fp8_tile(w_ptrs, mask, NATIVE_FP8: tl.constexpr):
    """The e4m3 bytes at w_ptrs as fp32 (the GPU's conversion on sm89+, else the integer decoder)."""
    wb = tl.load(w_ptrs, mask=mask, other=0)
    if NATIVE_FP8:
        return wb.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    return e4m3_to_fp32(wb.to(tl.int32))


@triton.jit
def _fp8_run_products(w_ptrs, mask, x, s, NATIVE_FP8: tl.constexpr):
    """Σ over each 16-byte run of the tile at w_ptrs [BN, J, 16] of weight · x [J, 16], times the run's
    scale s [1, J] -> [BN, J] fp32."""
    return tl.sum(_fp8_tile(w_ptrs, mask, NATIVE_FP8) * x[None, :, :], 2) * s


@launchable
@triton.jit
def _fp8_gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, group_n, stride_xm, stride_xg, stride_wn, stride_sn,
                     stride_ym, ROWS: tl.constexpr, SBN: tl.constexpr, SBK: tl.constexpr, SCALE_E8M0: tl.constexpr,
                     NATIVE_FP8: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, RSUB: tl.constexpr = 1,
                     PDL: tl.constexpr = False):
    """y[r, n-tile] = Σ_k x[r, g, k] · s[n // SBN, k // SBK] · Wq[n, k] for the ROWS (1..4) rows of x,
    where g = n // group_n is the group of output row n (grouped projections such as `wo_a`: each group
    of group_n rows reads its own slice of x, `stride_xg` apart; one group: stride_xg = 0).

    A chunk of BK columns is a [BN, J, 16] tile: J = BK / 16 runs of 16 bytes, each one 16-byte load by
    one thread and inside one scale block (SBK >= 16). A run's 16 products are summed in the thread (an
    FMA chain), then its block scale multiplies that partial sum (exact for e8m0) into acc_r [BN, J];
    the program's BN rows lie in one scale row-block (SBN % BN == 0). One accumulator per row of x, so
    the weight tile is decoded once for all rows; the J lanes are reduced once, after the loop.

    RSUB (2 or 4, one row of x only): the tile is read as RSUB sub-tiles [BN / RSUB, J, 16] of the same
    layout, so that a thread holds the same runs of x for RSUB weight rows and loads and converts them
    once for all of them (x's loads and conversion are otherwise ~2 of a run's instructions per weight
    byte, `bench/sass_fp8_gemv.py`)."""
    pdl_start(PDL)
    V: tl.constexpr = 16
    J: tl.constexpr = BK // V
    BS: tl.constexpr = BN // RSUB
    pid = tl.program_id(0)
    rn = pid * BN + tl.arange(0, BS)
    n_ok = rn < N
    x_ptr += ((pid * BN) // group_n).to(tl.int64) * stride_xg           # the program's rows lie in one group
    jv = V * tl.arange(0, J)                                             # [J]: each run's first column
    kk = jv[:, None] + tl.arange(0, V)[None, :]                          # [J, V]: a chunk's columns
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None, None] * stride_wn + kk[None, :, :]
    s_ptrs = s_ptr + ((pid * BN) // SBN) * stride_sn                    # the program's row of scales
    sub = BS * stride_wn.to(tl.int64)                                   # one sub-tile's rows further on
    acc0 = tl.full((BS, J), 0.0, tl.float32)
    acc1 = tl.full((BS, J), 0.0, tl.float32)
    acc2 = tl.full((BS, J), 0.0, tl.float32)
    acc3 = tl.full((BS, J), 0.0, tl.float32)
    for k0 in range(0, K, BK):
        k_ok = (k0 + kk) < K
        run_ok = (k0 + jv) < K
        if SCALE_E8M0:
            s = e8m0_to_fp32(tl.load(s_ptrs + (k0 + jv) // SBK, mask=run_ok, other=127).to(tl.int32))
        else:
            s = tl.load(s_ptrs + (k0 + jv) // SBK, mask=run_ok, other=1.0)
        s = s[None, :]
        xv = tl.load(x_ptr + k0 + kk, mask=k_ok, other=0.0).to(tl.float32)
        if RSUB > 1:                   # one row of x, RSUB sub-tiles of weight rows
            acc0 += _fp8_run_products(w_ptrs + k0, n_ok[:, None, None] & k_ok[None, :, :], xv, s, NATIVE_FP8)
            acc1 += _fp8_run_products(w_ptrs + sub + k0, (rn + BS < N)[:, None, None] & k_ok[None, :, :], xv, s,
                                      NATIVE_FP8)
            if RSUB > 2:
                acc2 += _fp8_run_products(w_ptrs + 2 * sub + k0, (rn + 2 * BS < N)[:, None, None] & k_ok[None, :, :],
                                          xv, s, NATIVE_FP8)
                acc3 += _fp8_run_products(w_ptrs + 3 * sub + k0, (rn + 3 * BS < N)[:, None, None] & k_ok[None, :, :],
                                          xv, s, NATIVE_FP8)
        else:
            w = _fp8_tile(w_ptrs + k0, n_ok[:, None, None] & k_ok[None, :, :], NATIVE_FP8)
            acc0 += tl.sum(w * xv[None, :, :], 2) * s
            if ROWS > 1:
                xv = tl.load(x_ptr + stride_xm + k0 + kk, mask=k_ok, other=0.0).to(tl.float32)
                acc1 += tl.sum(w * xv[None, :, :], 2) * s
            if ROWS > 2:
                xv = tl.load(x_ptr + 2 * stride_xm + k0 + kk, mask=k_ok, other=0.0).to(tl.float32)
                acc2 += tl.sum(w * xv[None, :, :], 2) * s
            if ROWS > 3:
                xv = tl.load(x_ptr + 3 * stride_xm + k0 + kk, mask=k_ok, other=0.0).to(tl.float32)
                acc3 += tl.sum(w * xv[None, :, :], 2) * s
    out_ty = y_ptr.dtype.element_ty
    tl.store(y_ptr + rn, tl.sum(acc0, 1).to(out_ty), mask=n_ok)
    if RSUB > 1:
        tl.store(y_ptr + BS + rn, tl.sum(acc1, 1).to(out_ty), mask=rn + BS < N)
        if RSUB > 2:
            tl.store(y_ptr + 2 * BS + rn, tl.sum(acc2, 1).to(out_ty), mask=rn + 2 * BS < N)
            tl.store(y_ptr + 3 * BS + rn, tl.sum(acc3, 1).to(out_ty), mask=rn + 3 * BS < N)
    else:
        if ROWS > 1:
            tl.store(y_ptr + stride_ym + rn, tl.sum(acc1, 1).to(out_ty), mask=n_ok)
        if ROWS > 2:
            tl.store(y_ptr + 2 * stride_ym + rn, tl.sum(acc2, 1).to(out_ty), mask=n_ok)
        if ROWS > 3:
            tl.store(y_ptr + 3 * stride_ym + rn, tl.sum(acc3, 1).to(out_ty), mask=n_ok)


# ----------------------------------------------------------------------------- launch
@functools.lru_cache(maxsize=None)
def _device_info(index: int) -> tuple[tuple[int, int], int]:
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor), props.multi_processor_count


def _tiles(M: int, N: int, K: int, sbk: int, device: torch.device) -> tuple[dict, int]:
    """Tile sizes and the K split for this shape (fixed heuristics, no autotuning: the first call of a
    new shape costs nothing, which matters inside CUDA-graph warm-up)."""
    if INTERPRET or device.type != "cuda":
        return dict(BM=16, BN=32, BK=min(32, sbk), GROUP_M=4, num_warps=4, num_stages=1), 1
    _, sms = _device_info(device.index if device.index is not None else torch.cuda.current_device())
    bk = min(128, sbk)
    if M <= 64:
        cfg = dict(BM=16 if M <= 16 else 32 if M <= 32 else 64, BN=64, BK=bk, GROUP_M=1, num_warps=4, num_stages=4)
    else:
        cfg = dict(BM=128, BN=128, BK=min(64, sbk), GROUP_M=8, num_warps=8, num_stages=3)
    tiles = cdiv(M, cfg["BM"]) * cdiv(N, cfg["BN"])
    k_steps = cdiv(K, cfg["BK"])
    split = 1
    if M <= 64 and tiles < 2 * sms:   # memory-bound: give every SM a couple of programs
        split = max(1, min(k_steps // 4, cdiv(2 * sms, tiles)))
    return cfg, split


def _native_fp8(device: torch.device) -> bool:
    """Whether the GPU converts e4m3 natively (sm89+); elsewhere the kernel decodes the bits itself."""
    if INTERPRET or device.type != "cuda":
        return False
    return _device_info(device.index if device.index is not None else torch.cuda.current_device())[0] >= (8, 9)


def _check(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> None:
    if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D float8_e4m3fn tensor, got {weight.dtype} {tuple(weight.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {weight.shape[1]}")
    N, K = weight.shape
    want = (cdiv(N, block[0]), cdiv(K, block[1]))
    if tuple(scale.shape) != want or scale.dtype not in (torch.float8_e8m0fnu, torch.float32):
        raise ValueError(f"scale must be e8m0 or fp32 of shape {want} for a weight {(N, K)} with {block} blocks; "
                         f"got {scale.dtype} {tuple(scale.shape)}")
    if block[1] < 16 or block[1] & (block[1] - 1) or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"the Triton FP8 GEMM needs bf16/fp16/fp32 activations and a K block that is a power of "
                         f"two >= 16; got {x.dtype}, block {block}")


GEMV_MAX_ROWS = 2        # at most this many rows of x take the GEMV (module docstring: why 2, measured)
GEMV_ROWS = 4            # rows of x one GEMV launch carries (its accumulators); more rows: more launches
GEMV_BN_MAX = 32         # output rows per GEMV program at most
# weight sub-tiles sharing x's registers in the default launch of one row of x (`_fp8_gemv_kernel`); H200,
# weights from HBM (`bench/probe_fp8_gemv.py`): 2 sub-tiles of 2 rows over 2048 columns against the one-row
# rule's tiles: wq_a 3.61 against 4.07 us, wo_b 10.98 against 14.86, shared w1 4.56 against 5.72; wq_b at
# 32 rows x 256 columns 13.36 against 18.14
GEMV_RSUB = 2
# launch variants of the GEMV for timing (`bench/probe_fp8_gemv.py`); `fp8_gemv(..., **variant)` runs one.
# Tiles of 2048..16384 weights (16..128 per thread), from one row over 4096 columns to 32 rows over 128,
# so that every V4-Flash shape (512..32768 rows) has some with >= 2 programs per SM; fewer warps at the
# same tile give a thread more rows (x converted once for them). num_stages 3 measured the same as 2.
GEMV_VARIANTS = [dict(BN=bn, BK=bk, num_warps=nw, num_stages=2) for bn, bk, nw in
                 [(1, 1024, 2), (1, 2048, 4), (1, 4096, 4), (2, 1024, 2), (2, 2048, 4), (4, 512, 2),
                  (4, 1024, 4), (8, 256, 2), (8, 512, 4), (8, 1024, 4), (16, 256, 4), (16, 512, 4),
                  (16, 512, 8), (32, 128, 4), (32, 256, 4), (32, 512, 8)]]


def _pow2_divisor(n: int) -> int:
    """The largest power of two dividing n (n >= 1)."""
    return n & -n


def _gemv_tiles(M: int, N: int, K: int, block_n: int, device: torch.device, per_sm: int = 6) -> dict:
    """The default GEMV launch: BN the largest power of two <= GEMV_BN_MAX with N / BN >= per_sm·SMs (at
    least one row), and dividing the scale block's rows; BK filling a tile of 4096 weights (32 per
    thread: two 16-byte loads), at least 64 and at most K rounded up to a power of two. One row of x:
    `GEMV_RSUB` sub-tiles sharing x (`gemv_launch`)."""
    if INTERPRET or device.type != "cuda":
        return dict(BN=min(32, GEMV_BN_MAX, _pow2_divisor(block_n)), BK=128, num_warps=4, num_stages=1, RSUB=1)
    _, sms = _device_info(device.index if device.index is not None else torch.cuda.current_device())
    return gemv_launch(N, K, block_n, sms, per_sm, GEMV_RSUB if M == 1 else 1)


def gemv_launch(N: int, K: int, block_n: int, sms: int, per_sm: int = 6, rsub: int = 1) -> dict:
    """`_gemv_tiles` on a GPU of `sms` SMs (a pure function of the shape: `bench/sass_fp8_gemv.py`).
    With rsub > 1 (one row of x), rsub sub-tiles of at least two rows share x: BN at least 2·rsub and a
    tile of 4096·rsub weights, so that each sub-tile still gives every thread a 16-byte run."""
    cap = min(GEMV_BN_MAX, _pow2_divisor(block_n))
    bn = 1
    while 2 * bn <= cap and N // (2 * bn) >= per_sm * sms:
        bn *= 2
    if rsub > 1:
        bn = min(cap, max(bn, 2 * rsub))
        rsub = min(rsub, bn)
    bk = min(max(64, 4096 * rsub // bn), max(64, next_pow2(K)))
    return dict(BN=bn, BK=bk, num_warps=4, num_stages=2, RSUB=rsub)


def _fp8_gemv(x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block_n: int, block_k: int,
              y: torch.Tensor, cfg: dict, groups: int = 1):
    """y [M, N] = x2 [M, K] (unit column stride) · (weight ⊙ scale)ᵀ: one launch per GEMV_ROWS rows; with
    `groups` G > 1, x2 is [M, G, K] and output rows [g·N/G, (g+1)·N/G) read x2[:, g]. Returns the last
    launch's compiled kernel (registers and spills for the benchmarks)."""
    M, K = x2.shape[0], x2.shape[-1]
    N = weight.shape[0]
    BN, BK, RSUB = int(cfg["BN"]), int(cfg["BK"]), int(cfg.get("RSUB", 1))
    if BN < 1 or BN & (BN - 1) or block_n % BN or BK < 16 or BK & (BK - 1) or (groups > 1 and (N // groups) % BN):
        raise ValueError(f"GEMV tiles: BN must be a power of two dividing the scale block's {block_n} rows (and "
                         f"a group's {N // groups}) and BK a power of two >= 16; got BN={BN}, BK={BK}")
    if RSUB not in (1, 2, 4) or BN % RSUB:
        raise ValueError(f"GEMV tiles: RSUB (weight sub-tiles sharing x) must be 1, 2 or 4 and divide BN={BN}; "
                         f"got {RSUB}")
    w = weight.contiguous().view(torch.uint8)
    e8m0 = scale.dtype == torch.float8_e8m0fnu
    s = scale.contiguous().view(torch.uint8) if e8m0 else scale.contiguous()
    native = _native_fp8(x2.device)
    grid = (cdiv(N, BN),)
    kernel = None
    for r0 in range(0, M, GEMV_ROWS):
        rows = min(GEMV_ROWS, M - r0)
        kernel = _fp8_gemv_kernel[grid](
            x2[r0:], w, s, y[r0:], N, K, N // groups, x2.stride(0), x2.stride(1) if groups > 1 else 0,
            w.stride(0), s.stride(0), y.stride(0),
            ROWS=rows, SBN=block_n, SBK=block_k, SCALE_E8M0=e8m0, NATIVE_FP8=native, BN=BN, BK=BK,
            RSUB=RSUB if rows == 1 else 1,
            num_warps=int(cfg.get("num_warps", 4)), num_stages=int(cfg.get("num_stages", 2)), **pdl(x2[r0:]))
    return kernel


def _fp8_gemm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block_n: int, block_k: int,
              path: str | None = None, gemv: dict | None = None) -> torch.Tensor:
    """`path`: None (GEMV up to GEMV_MAX_ROWS rows of x, else tiled), 'gemv' or 'tiled'; `gemv`: launch
    settings overriding the default GEMV tiles (BN, BK, num_warps, num_stages)."""
    K = x.shape[-1]
    N = weight.shape[0]
    x2 = x.reshape(-1, K)                                                         # [M, K]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y.view(*x.shape[:-1], N)
    if path is None:
        path = "gemv" if M <= GEMV_MAX_ROWS else "tiled"
    if path == "gemv":
        _fp8_gemv(x2, weight, scale, block_n, block_k, y, {**_gemv_tiles(M, N, K, block_n, x.device), **(gemv or {})})
        return y.view(*x.shape[:-1], N)
    if path != "tiled":
        raise ValueError(f"path must be None, 'gemv' or 'tiled', got {path!r}")
    cfg, split = _tiles(M, N, K, block_k, x.device)
    bk = cfg["BK"]
    k_per_split = cdiv(cdiv(K, split), bk) * bk       # a multiple of BK (so of no scale block edge)
    split = cdiv(K, k_per_split)
    out = y if split == 1 else torch.empty(split, M, N, dtype=torch.float32, device=x.device)
    w = weight.contiguous().view(torch.uint8)
    e8m0 = scale.dtype == torch.float8_e8m0fnu
    s = scale.contiguous().view(torch.uint8) if e8m0 else scale.contiguous()
    native = _native_fp8(x.device)
    grid = (cdiv(M, cfg["BM"]) * cdiv(N, cfg["BN"]), split)
    _fp8_gemm_kernel[grid](
        x2, w, s, out, M, N, K, k_per_split, x2.stride(0), w.stride(0), s.stride(0),
        out.stride(-2), out.stride(0) if split > 1 else 0,
        SBN=block_n, SBK=block_k, SCALE_E8M0=e8m0, NATIVE_FP8=native,
        DOT_FP32=INTERPRET or x.dtype == torch.float32, **cfg, **pdl(x2))
    if split > 1:
        y = out.sum(0).to(x.dtype)
    return y.view(*x.shape[:-1], N)


# a custom op, so that `torch.compile(fullgraph=True)` of the decode step treats the launch as one node
@torch.library.custom_op("dsv4::fp8_gemm", mutates_args=())
def _fp8_gemm_op(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block_n: int,
                 block_k: int) -> torch.Tensor:
    return _fp8_gemm(x, weight, scale, block_n, block_k)


@_fp8_gemm_op.register_fake
def _(x, weight, scale, block_n, block_k):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
               block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """x [..., K] (bf16/fp16/fp32) · (weight [N, K] e4m3 ⊙ scale per block)ᵀ -> [..., N] in x's dtype.
    Twin: `dsv4.ops.fp8_linear_torch`."""
    _check(x, weight, scale, block)
    if torch.compiler.is_compiling():
        return _fp8_gemm_op(x, weight, scale, int(block[0]), int(block[1]))
    return _fp8_gemm(x, weight, scale, int(block[0]), int(block[1]))   # eager: skip the dispatcher


def fp8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = (128, 128),
             **tiles) -> torch.Tensor:
    """`fp8_linear` through the GEMV path at any number of rows, with launch settings `tiles` (BN, BK,
    num_warps, num_stages; e.g. one of GEMV_VARIANTS) overriding the default ones: for timing variants."""
    _check(x, weight, scale, block)
    return _fp8_gemm(x, weight, scale, int(block[0]), int(block[1]), path="gemv", gemv=tiles)


def fp8_grouped_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                     block: tuple[int, int] = (128, 128), **tiles) -> torch.Tensor:
    """A grouped projection on FP8 weights, the GEMV of decode: x [..., G, K] and weight [G·R, K] (group g
    owns rows [g·R, (g+1)·R)) -> y [..., G·R] with y[..., g·R + r] = Σ_k x[..., g, k] · W[g·R + r, k]
    (the attention's `wo_a`, spec §6: 'bsgi,gri->bsgr'). One launch per GEMV_ROWS rows of leading dims,
    the weight read once; `tiles` override the default GEMV tiles. Twin: `dsv4.ops.fp8_grouped_linear_torch`."""
    G, K = x.shape[-2], x.shape[-1]
    _check(x, weight, scale, block)
    N = weight.shape[0]
    if N % G:
        raise ValueError(f"the weight's {N} rows do not split into the input's {G} groups")
    x3 = x.reshape(-1, G, K)                                                     # [M, G, K]
    if x3.stride(-1) != 1:
        x3 = x3.contiguous()
    M = x3.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M:
        # 12 programs per SM: V4-Flash's wo_a (8192 x 4096) at BN 4, BK 1024 took 12.6 us at batch 1 and
        # 16.1 at 2, against 13.8 and 23.0 at the plain GEMV's BN 8, BK 512 (H200, bench/probe_flash_decode.py)
        cfg = {**_gemv_tiles(M, N, K, math.gcd(int(block[0]), N // G), x.device, per_sm=12), **tiles}
        _fp8_gemv(x3, weight, scale, int(block[0]), int(block[1]), y, cfg, groups=G)
    return y.view(*x.shape[:-2], N)
