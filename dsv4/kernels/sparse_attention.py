"""Sparse attention with a sink over per-query key lists (twin: `dsv4.ops.sparse_attention_torch`).

One program handles one query token and a block of heads: all heads share the token's key list (one
K=V head), so each listed key row is loaded once per head block and used by BLOCK_H heads (tensor-core
`tl.dot` with the heads as the M dimension). Keys come from two sources: kv [B, T, Dh] (index j < T) and
kv2 [B2, T2, Dh] read at row rows2[b] (index j ≥ T), so a decode step reads the cache in place.
Online softmax in the log2 domain, fp32 accumulators, the sink joins the denominator at the end.
kv2 may hold FP8 rows (`dsv4.ops.KV8`, a cache with `kv_fp8`): decoded as they are loaded (the native
e4m3 conversion on sm89+, integer decoding elsewhere and under the interpreter).

* `forward`: out [B, S, H, Dh] and lse [B, S, H] (natural log, sink included).
* `forward_split`: the same, splitting each query's key list over several programs (flash-decoding)
  and merging the partial results; for decode (few queries, long lists).
* `backward`: dq (per program, no atomics) and the key gradient, accumulated with fp32 atomics
  into dkv/dkv2 (a key row is listed by many queries).
FLOPs per (query, listed key, head): 4·Dh forward (q·k and p·v), 8·Dh backward (recomputed q·k,
dO·k, dS·k, dSᵀq and pᵀdO).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET
from .fp8_gemm import _native_fp8, e4m3_to_fp32, e8m0_to_fp32
from .launch import cdiv, launchable, next_pow2, pdl, pdl_start

LOG2E = 1.4426950408889634


@triton.jit
def _key_ptrs(KV, KV2, ROWS2, b, j, T, s_kvb, s_kvt, s_kv2b, s_kv2t, HAS_KV2: tl.constexpr, b1=None):
    """Row pointers of listed keys j [BLOCK_N] (j < T: kv[b1, j], b1 = b unless given; else
    kv2[rows2[b], j − T])."""
    jj = tl.maximum(j, 0).to(tl.int64)
    if b1 is None:
        b1 = b
    ptr = KV + b1.to(tl.int64) * s_kvb + jj * s_kvt
    if HAS_KV2:
        r2 = tl.load(ROWS2 + b).to(tl.int64)
        ptr2 = KV2 + r2 * s_kv2b + (jj - T) * s_kv2t
        ptr = tl.where(jj < T, ptr, ptr2)
    return ptr


@triton.jit
def _load_keys(KV, KV2, ROWS2, b, j, valid, d, T, s_kvb, s_kvt, s_kv2b, s_kv2t,
               HAS_KV2: tl.constexpr, KV2_FP8: tl.constexpr, NOPE: tl.constexpr, OFF_SC: tl.constexpr,
               OFF_ROPE: tl.constexpr, NATIVE_FP8: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, b1):
    """Listed key rows [BLOCK_N, D] in kv's dtype (0 where not valid); kv's row is b1 (rows1[b] or b).
    With KV2_FP8, kv2 holds FP8 rows (`dsv4.ops.kv8_quant`: e4m3 nope dims, one e8m0 scale per 64, rope
    dims in kv's dtype at byte OFF_ROPE), decoded here (exact: an e4m3 value times a power of two is a
    bf16); kv is read as it is."""
    if KV2_FP8:
        jj = tl.maximum(j, 0).to(tl.int64)
        in1 = valid & (jj < T)
        k1 = tl.load(KV + b1.to(tl.int64) * s_kvb + jj[:, None] * s_kvt + d[None, :], mask=in1[:, None], other=0.0)
        r2 = tl.load(ROWS2 + b).to(tl.int64)
        row = KV2 + r2 * s_kv2b + (jj - T) * s_kv2t                             # uint8 row pointers
        in2 = valid & (jj >= T)
        code = tl.load(row[:, None] + d[None, :], mask=in2[:, None] & (d[None, :] < NOPE), other=0)
        if NATIVE_FP8:
            val = code.to(tl.float8e4nv, bitcast=True).to(k1.dtype)
        else:
            val = e4m3_to_fp32(code.to(tl.int32)).to(k1.dtype)
        blk = tl.arange(0, D // 64)                                             # one scale per 64 dims
        sc = tl.load(row[:, None] + OFF_SC + blk[None, :], mask=in2[:, None] & (blk[None, :] < NOPE // 64),
                     other=127)
        scale = e8m0_to_fp32(sc.to(tl.int32)).to(k1.dtype)                      # [BLOCK_N, D / 64]
        val = tl.reshape(tl.reshape(val, [BLOCK_N, D // 64, 64]) * scale[:, :, None], [BLOCK_N, D])
        rope = (row + OFF_ROPE).to(tl.pointer_type(KV.dtype.element_ty))
        rv = tl.load(rope[:, None] + (d[None, :] - NOPE), mask=in2[:, None] & (d[None, :] >= NOPE), other=0.0)
        k = tl.where(in2[:, None], tl.where(d[None, :] < NOPE, val, rv), k1)
    else:
        ptr = _key_ptrs(KV, KV2, ROWS2, b, j, T, s_kvb, s_kvt, s_kv2b, s_kv2t, HAS_KV2, b1)
        k = tl.load(ptr[:, None] + d[None, :], mask=valid[:, None], other=0.0)
    return k


@launchable
@triton.jit
def _fwd_kernel(Q, KV, KV2, ROWS2, IDX, SINK, OUT, LSE, ML, ROWS1,
                s_qb, s_qs, s_qh, s_kvb, s_kvt, s_kv2b, s_kv2t, s_ib, s_is, s_ob, s_os, s_oh,
                S, H, T, K, K_PER, scale_log2,
                D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, HAS_KV2: tl.constexpr,
                SPLIT: tl.constexpr, F32_DOT: tl.constexpr, KV2_FP8: tl.constexpr = False,
                NOPE: tl.constexpr = 0, OFF_SC: tl.constexpr = 0, OFF_ROPE: tl.constexpr = 0,
                NATIVE_FP8: tl.constexpr = False, HAS_ROWS1: tl.constexpr = False, PDL: tl.constexpr = False):
    pdl_start(PDL)
    pid = tl.program_id(0)
    hb = tl.program_id(1)
    sp = tl.program_id(2)
    b = pid // S
    s = pid % S
    b1 = b                                                                      # kv's row
    if HAS_ROWS1:
        b1 = tl.load(ROWS1 + b)
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, D)
    hmask = h < H
    q = tl.load(Q + b.to(tl.int64) * s_qb + s.to(tl.int64) * s_qs + h[:, None] * s_qh + d[None, :],
                mask=hmask[:, None], other=0.0)
    if F32_DOT:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_H], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D], tl.float32)
    k_lo = sp * K_PER
    k_hi = tl.minimum(K, k_lo + K_PER)
    idx_row = IDX + b.to(tl.int64) * s_ib + s.to(tl.int64) * s_is
    for k0 in range(k_lo, k_hi, BLOCK_N):
        n = k0 + tl.arange(0, BLOCK_N)
        j = tl.load(idx_row + n, mask=n < k_hi, other=-1)
        valid = j >= 0
        k = _load_keys(KV, KV2, ROWS2, b, j, valid, d, T, s_kvb, s_kvt, s_kv2b, s_kv2t,      # [BLOCK_N, D]
                       HAS_KV2, KV2_FP8, NOPE, OFF_SC, OFF_ROPE, NATIVE_FP8, BLOCK_N, D, b1)
        if F32_DOT:
            k = k.to(tl.float32)
            z = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
        else:
            z = tl.dot(q, tl.trans(k)) * scale_log2                                 # [BLOCK_H, BLOCK_N]
        z = tl.where(valid[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(z - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if F32_DOT:
            acc = acc * alpha[:, None] + tl.dot(p, k, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(k.dtype), k)
        m_i = m_new
    if SPLIT:   # partial results: unnormalised acc, running max and sum (log2 domain), merged later
        row = (pid * tl.num_programs(2) + sp).to(tl.int64)
        tl.store(OUT + row * s_ob + h[:, None] * s_oh + d[None, :], acc, mask=hmask[:, None])
        tl.store(ML + row * (2 * H) + h, m_i, mask=hmask)
        tl.store(ML + row * (2 * H) + H + h, l_i, mask=hmask)
    else:
        sink = tl.load(SINK + h, mask=hmask, other=0.0).to(tl.float32) * 1.4426950408889634
        m_new = tl.maximum(m_i, sink)
        alpha = tl.exp2(m_i - m_new)
        l = l_i * alpha + tl.exp2(sink - m_new)
        out = acc * (alpha / l)[:, None]
        tl.store(OUT + b.to(tl.int64) * s_ob + s.to(tl.int64) * s_os + h[:, None] * s_oh + d[None, :],
                 out.to(OUT.dtype.element_ty), mask=hmask[:, None])
        tl.store(LSE + pid.to(tl.int64) * H + h, (m_new + tl.log2(l)) * 0.6931471805599453, mask=hmask)


@launchable
@triton.jit
def _bwd_kernel(Q, KV, KV2, ROWS2, IDX, DO, LSE, DELTA, DQ, DKV, DKV2,
                s_qb, s_qs, s_qh, s_kvb, s_kvt, s_kv2b, s_kv2t, s_ib, s_is,
                s_dkvb, s_dkvt, s_dkv2b, s_dkv2t,
                S, H, T, K, scale,
                D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, HAS_KV2: tl.constexpr,
                F32_DOT: tl.constexpr, PDL: tl.constexpr = False):
    pdl_start(PDL)
    pid = tl.program_id(0)
    hb = tl.program_id(1)
    b = pid // S
    s = pid % S
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, D)
    hmask = h < H
    qoff = b.to(tl.int64) * s_qb + s.to(tl.int64) * s_qs + h[:, None] * s_qh + d[None, :]
    q = tl.load(Q + qoff, mask=hmask[:, None], other=0.0)
    do = tl.load(DO + qoff, mask=hmask[:, None], other=0.0)
    if F32_DOT:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + pid.to(tl.int64) * H + h, mask=hmask, other=0.0)
    delta = tl.load(DELTA + pid.to(tl.int64) * H + h, mask=hmask, other=0.0)
    dq = tl.zeros([BLOCK_H, D], tl.float32)
    idx_row = IDX + b.to(tl.int64) * s_ib + s.to(tl.int64) * s_is
    for k0 in range(0, K, BLOCK_N):
        n = k0 + tl.arange(0, BLOCK_N)
        j = tl.load(idx_row + n, mask=n < K, other=-1)
        valid = j >= 0
        ptr = _key_ptrs(KV, KV2, ROWS2, b, j, T, s_kvb, s_kvt, s_kv2b, s_kv2t, HAS_KV2)
        k = tl.load(ptr[:, None] + d[None, :], mask=valid[:, None], other=0.0)      # [BLOCK_N, D]
        if F32_DOT:
            k = k.to(tl.float32)
            z = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            dp = tl.dot(do, tl.trans(k), input_precision="ieee")
        else:
            z = tl.dot(q, tl.trans(k)) * scale
            dp = tl.dot(do, tl.trans(k))
        p = tl.exp(z - lse[:, None])
        p = tl.where(valid[None, :] & hmask[:, None], p, 0.0)                          # [BLOCK_H, BLOCK_N]
        ds = p * (dp - delta[:, None])
        if F32_DOT:
            dq += tl.dot(ds, k, input_precision="ieee")
            dk = tl.dot(tl.trans(ds), q, input_precision="ieee") * scale + \
                tl.dot(tl.trans(p), do, input_precision="ieee")
        else:
            dq += tl.dot(ds.to(k.dtype), k)
            dk = tl.dot(tl.trans(ds.to(q.dtype)), q) * scale + tl.dot(tl.trans(p.to(do.dtype)), do)
        jj = tl.maximum(j, 0).to(tl.int64)
        dptr = DKV + b.to(tl.int64) * s_dkvb + jj * s_dkvt
        if HAS_KV2:
            r2 = tl.load(ROWS2 + b).to(tl.int64)
            dptr = tl.where(jj < T, dptr, DKV2 + r2 * s_dkv2b + (jj - T) * s_dkv2t)
        tl.atomic_add(dptr[:, None] + d[None, :], dk, mask=valid[:, None], sem="relaxed")
    tl.store(DQ + qoff, (dq * scale).to(DQ.dtype.element_ty), mask=hmask[:, None])


def _block_h(H: int) -> int:
    return max(16, min(next_pow2(H), 32 if not INTERPRET else 64))


def _check(q, kv, idx, kv2, rows2):
    B, S, H, D = q.shape
    if D & (D - 1) or D < 16:
        raise ValueError(f"sparse_attention kernel: head dim {D} must be a power of two >= 16")
    data2 = kv2.data if _is_kv8(kv2) else kv2
    if kv.stride(-1) != 1 or q.stride(-1) != 1 or (data2 is not None and data2.stride(-1) != 1):
        raise ValueError("sparse_attention kernel: the last dim of q, kv, kv2 must be contiguous")
    if kv2 is not None and kv2.dtype != kv.dtype:
        raise ValueError(f"sparse_attention kernel: kv {kv.dtype} and kv2 {kv2.dtype} must share a dtype")
    if _is_kv8(kv2) and kv2.width != D:
        raise ValueError(f"sparse_attention kernel: FP8 entries of width {kv2.width} for head dim {D}")


def _is_kv8(kv2) -> bool:
    from dsv4.ops import KV8
    return isinstance(kv2, KV8)


def _kv2_args(q, kv, kv2, rows2, idx) -> tuple:
    """(kv2 tensor, rows2, has kv2, FP8 constexprs) for a launch: kv2 may be None, a tensor or an FP8
    `dsv4.ops.KV8` (its byte rows are passed, strides in bytes)."""
    B = q.shape[0]
    has2 = kv2 is not None and kv2.shape[1] > 0
    k2 = (kv2.data if _is_kv8(kv2) else kv2) if has2 else kv
    if not has2:       # (unread: the key lists stand in, so that a sliding layer's step launches no arange)
        r2 = idx
    else:
        r2 = rows2 if rows2 is not None else torch.arange(B, device=q.device, dtype=torch.int32)
    fp8 = {}
    if has2 and _is_kv8(kv2):
        from dsv4.ops import kv8_layout
        off_sc, off_rope, _ = kv8_layout(kv2.width, kv2.rope_dim, kv2.dtype)
        fp8 = dict(KV2_FP8=True, NOPE=kv2.width - kv2.rope_dim, OFF_SC=off_sc, OFF_ROPE=off_rope,
                   NATIVE_FP8=_native_fp8(q.device))
    return k2, r2, has2, fp8


# Launch parameters by head count, from `bench/probe_attn.py` on the H200 (bf16, Dh 512, 128 window keys
# + 512 listed entries, 4K queries; `probe_attn_2026-12-03_h200.json`):
# * forward, 64+ heads: 64 heads per program, 64-key blocks, 8 warps, 2 stages: 236 TFLOP/s, against 130
#   for 32 heads / 32 keys / 4 warps / 3 stages (the 8 warps hold the 64 × 512 fp32 accumulator: 128
#   registers a thread);
# * forward, 16 heads: 32-key blocks, 4 warps, 2 stages: 119 TFLOP/s (85 with 3 stages);
# * backward: 16 heads per program at any head count (64 heads: 54.5 TFLOP/s against 50.2 for 32), 16-key
#   blocks at 16 heads (57.1 against 52-54 for 32), 2 stages (1 at 64 heads, where 2 run out of shared memory
#   at 32-key blocks).
# Not faster (`probe_attn.py --round9`, ninth round of bench/results): rescaling the accumulator only when a
# max grows by more than 2^8 (191 against 236 TFLOP/s: the branch costs the pipelining), 16 warps (112),
# Triton's warp_specialize on the key loop (no change), 128 heads a program (out of registers).
# fp32 tiles take twice the shared memory: fp32 keeps the launch of before the sweep. Under the interpreter
# the key blocks are larger (its cost is per op) and the stages do not matter.
WARPS = 4
# The decode path (`forward_split`): keys per split at least, key block, heads per program, warps, and the
# merge's heads and columns per program. H200, V4-Flash's 64 heads × 512, keys from HBM
# (`bench/probe_decode_attn.py`, fifteenth round of bench/results): 16 heads a program took ~1.7 µs less
# than 32 in every layer kind at batch 1; the merge reading 8 splits at a time over 4 heads × 512 columns
# (or 2 × 256) took 14.7-15.0 µs for a CSA layer's 640 keys against 20.1 over 8 × 128, and at batch 32
# 57.7 against 91-96 for the other shapes (16 × 512 at 8 splits a load spills; the previous form, 16 × 512
# one split at a time, was timed in the model only: 0.150 ms a layer, fourteenth round).
SPLIT_KEYS = 64
SPLIT_BLOCK_N = 32
SPLIT_BLOCK_H = 16
SPLIT_WARPS = 4
MERGE = (4, 512)


def _fwd_launch(H: int, dtype: torch.dtype) -> dict:
    if INTERPRET:
        return {"block_h": _block_h(H), "block_n": 128, "num_warps": WARPS, "num_stages": None}
    if dtype == torch.float32:     # twice the shared memory a tile: the launch of before the sweep
        return {"block_h": _block_h(H), "block_n": 32, "num_warps": WARPS, "num_stages": None}
    if H >= 64:
        return {"block_h": 64, "block_n": 64, "num_warps": 8, "num_stages": 2}
    return {"block_h": _block_h(H), "block_n": 32, "num_warps": WARPS, "num_stages": 2}


def _fp8_stages(block_h: int, dtype: torch.dtype, stages: int | None) -> int | None:
    """Pipeline stages for FP8 entries (`KV8`): a key block's loads take ~80 KB of shared memory a stage at
    Dh 512 in bf16 (the window tile, the e4m3 codes and the rope tile, each a full [keys, Dh] buffer), so
    Triton's default 3 stages need 246 KB (> 227 KB on the H100/H200) and a 64-head block's 2 stages 295 KB
    (`bench/ptxas_report.py`). Two stages where they fit, else one."""
    if INTERPRET:
        return stages
    if block_h >= 64 or dtype == torch.float32:
        return 1
    return min(stages or 3, 2)


def _bwd_launch(H: int, dtype: torch.dtype) -> dict:
    if INTERPRET or dtype == torch.float32:
        return {"block_h": _block_h(H), "block_n": 32, "num_warps": 4, "num_stages": None}
    return {"block_h": 16, "block_n": 16 if H <= 16 else 32, "num_warps": 4, "num_stages": 2 if H <= 16 else 1}


def forward(q, kv, idx, sink, scale, kv2=None, rows2=None, block_n: int | None = None, num_warps: int | None = None,
            block_h: int | None = None, num_stages: int | None = None, rows1=None):
    """out [B, S, H, Dh] (q's dtype), lse [B, S, H] fp32. Shapes as the twin's. Launch parameters left
    None take `_fwd_launch`'s choice for the head count. rows1 [B]: kv's row of each query row (kv
    [Bmax, T, Dh] read in place, as kv2 with rows2; default: row b)."""
    _check(q, kv, idx, kv2, rows2)
    B, S, H, D = q.shape
    dflt = _fwd_launch(H, q.dtype)
    block_n, num_warps = block_n or dflt["block_n"], num_warps or dflt["num_warps"]
    block_h, num_stages = block_h or dflt["block_h"], num_stages or dflt["num_stages"]
    K = idx.shape[-1]
    idx = idx if idx.stride(-1) == 1 else idx.contiguous()
    out = torch.empty_like(q)
    lse = torch.empty(B, S, H, device=q.device, dtype=torch.float32)
    if B * S == 0:
        return out, lse
    k2, r2, has2, fp8 = _kv2_args(q, kv, kv2, rows2, idx)
    if fp8 and num_stages == dflt["num_stages"]:
        num_stages = _fp8_stages(block_h, q.dtype, num_stages)
    BH = block_h
    f32 = INTERPRET or q.dtype == torch.float32
    grid = (B * S, cdiv(H, BH), 1)
    launch = {"num_stages": num_stages} if num_stages else {}
    _fwd_kernel[grid](q, kv, k2, r2, idx, sink, out, lse, lse, rows1 if rows1 is not None else r2,
                      q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), k2.stride(0), k2.stride(1),
                      idx.stride(0), idx.stride(1), out.stride(0), out.stride(1), out.stride(2),
                      S, H, kv.shape[1], K, K, scale * LOG2E,
                      D=D, BLOCK_H=BH, BLOCK_N=block_n, HAS_KV2=has2, SPLIT=False, F32_DOT=f32,
                      HAS_ROWS1=rows1 is not None, num_warps=num_warps, **launch, **fp8, **pdl(q))
    return out, lse


def forward_split(q, kv, idx, sink, scale, kv2=None, rows2=None, splits: int = 0, block_n: int | None = None,
                  num_warps: int | None = None, rows1=None, block_h: int | None = None,
                  merge: tuple[int, ...] | None = None):
    """`forward` with each key list split over `splits` programs (0: enough to fill ~2 waves of SMs) and
    the partial results merged by a second launch (`_combine_kernel`, `merge` = (heads, columns[, splits
    read at once, default 8]) per program; default `MERGE`). Merging them in the first launch,
    by the last of a query's programs to finish, measured slower on the H200 at V4-Flash's decode (10.0 +
    4.4 µs against 23.9 µs: one program then reads all the partials; bench/results/README.md, ninth
    round)."""
    _check(q, kv, idx, kv2, rows2)
    B, S, H, D = q.shape
    K = idx.shape[-1]
    BH = block_h or SPLIT_BLOCK_H or _block_h(H)
    nh = cdiv(H, BH)
    block_n = block_n or SPLIT_BLOCK_N
    if splits <= 0:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 8
        splits = max(1, min(cdiv(K, SPLIT_KEYS), cdiv(2 * sms, B * S * nh)))
    per = cdiv(cdiv(K, splits), block_n) * block_n
    splits = cdiv(K, per) if K else 1
    idx = idx if idx.stride(-1) == 1 else idx.contiguous()
    k2, r2, has2, fp8 = _kv2_args(q, kv, kv2, rows2, idx)
    stages = _fp8_stages(BH, q.dtype, None) if fp8 else None
    launch = {"num_stages": stages} if stages else {}
    part = torch.empty(B * S * splits, H, D, device=q.device, dtype=torch.float32)
    ml = torch.empty(B * S * splits, 2, H, device=q.device, dtype=torch.float32)
    f32 = INTERPRET or q.dtype == torch.float32
    out = torch.empty(B, S, H, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, S, H, device=q.device, dtype=torch.float32)
    if B * S == 0:
        return out, lse
    _fwd_kernel[(B * S, nh, splits)](q, kv, k2, r2, idx, sink, part, ml, ml, rows1 if rows1 is not None else r2,
                                     q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1),
                                     k2.stride(0), k2.stride(1), idx.stride(0), idx.stride(1),
                                     part.stride(0), 0, part.stride(1),
                                     S, H, kv.shape[1], K, per, scale * LOG2E,
                                     D=D, BLOCK_H=BH, BLOCK_N=block_n, HAS_KV2=has2, SPLIT=True, F32_DOT=f32,
                                     HAS_ROWS1=rows1 is not None, num_warps=num_warps or SPLIT_WARPS, **launch, **fp8,
                                     **pdl(q))
    mh, md, *ms = merge or MERGE
    if any(v < 1 or v & (v - 1) for v in (mh, md, *ms)):
        raise ValueError(f"sparse_attention kernel: the merge's heads, columns and splits per load must be powers "
                         f"of two; got {merge or MERGE}")
    mh, md, ms = min(mh, next_pow2(H)), min(md, D), min(ms[0] if ms else 8, next_pow2(splits))
    _combine_kernel[(B * S, cdiv(H, mh), cdiv(D, md))](part, ml, sink, out, lse, splits, H, D=D, BLOCK_H=mh,
                                                       BLOCK_D=md, BLOCK_S=ms, **pdl(part))
    return out, lse


@launchable
@triton.jit
def _combine_kernel(PART, ML, SINK, OUT, LSE, SPLITS, H, D: tl.constexpr, BLOCK_H: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr = False):
    """Merge one query's split partials (unnormalised acc, running max m and sum l in the log2 domain)
    with the head's sink: out = Σ_s acc_s 2^(m_s − M) / (Σ_s l_s 2^(m_s − M) + 2^(sink − M)), for
    BLOCK_H heads and columns [BLOCK_D·c, BLOCK_D·(c+1)), c = program_id(2), reading BLOCK_S splits'
    partials per load (a decode step has one query: the columns spread its merge over programs)."""
    pdl_start(PDL)
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    c = tl.program_id(2)
    hm = h < H
    d = c * BLOCK_D + tl.arange(0, BLOCK_D)
    sv = tl.arange(0, BLOCK_S)
    sink = tl.load(SINK + h, mask=hm, other=0.0).to(tl.float32) * 1.4426950408889634
    mx = sink
    for s0 in range(0, SPLITS, BLOCK_S):
        row = t * SPLITS + s0 + sv                                                   # [BS]
        m2 = ((s0 + sv) < SPLITS)[:, None] & hm[None, :]
        mx = tl.maximum(mx, tl.max(tl.load(ML + row[:, None] * (2 * H) + h[None, :], mask=m2, other=-1.0e30), 0))
    den = tl.exp2(sink - mx)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for s0 in range(0, SPLITS, BLOCK_S):
        row = t * SPLITS + s0 + sv
        m2 = ((s0 + sv) < SPLITS)[:, None] & hm[None, :]
        a = tl.exp2(tl.load(ML + row[:, None] * (2 * H) + h[None, :], mask=m2, other=-1.0e30) - mx[None, :])
        den += tl.sum(tl.load(ML + row[:, None] * (2 * H) + H + h[None, :], mask=m2, other=0.0) * a, 0)
        part = tl.load(PART + (row[:, None, None] * H + h[None, :, None]) * D + d[None, None, :],
                       mask=m2[:, :, None], other=0.0)                                # [BS, BH, BD]
        acc += tl.sum(part * a[:, :, None], 0)
    tl.store(OUT + (t * H + h[:, None]) * D + d[None, :], (acc / den[:, None]).to(OUT.dtype.element_ty),
             mask=hm[:, None])
    tl.store(LSE + t * H + h, (mx + tl.log2(den)) * 0.6931471805599453, mask=hm & (c == 0))


@launchable
@triton.jit
def _delta_kernel(DOUT, OUT, LSE, DLSE, SINK, DELTA, DSINK, H, D, HAS_DLSE: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_D: tl.constexpr, PDL: tl.constexpr = False):
    """The backward's per-(query, head) terms for one query: delta = Σ_d dout·out (− dlse) and the sink's
    gradient share −exp(sink − lse)·delta (summed over queries by the caller), from the bf16 tensors
    directly (no fp32 copies of dout and out)."""
    pdl_start(PDL)
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    hm = h < H
    acc = tl.zeros([BLOCK_H], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        m = hm[:, None] & (d < D)[None, :]
        off = (t * H + h[:, None]) * D + d[None, :]
        a = tl.load(DOUT + off, mask=m, other=0.0).to(tl.float32)
        b = tl.load(OUT + off, mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(a * b, 1)
    if HAS_DLSE:
        acc -= tl.load(DLSE + t * H + h, mask=hm, other=0.0).to(tl.float32)
    lse = tl.load(LSE + t * H + h, mask=hm, other=0.0)
    sink = tl.load(SINK + h, mask=hm, other=0.0).to(tl.float32)
    tl.store(DELTA + t * H + h, acc, mask=hm)
    tl.store(DSINK + t * H + h, -tl.exp(sink - lse) * acc, mask=hm)


def backward_terms(out, dout, lse, sink, dlse=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(delta [B, S, H] fp32, dsink [H] in sink's dtype) of the backward: delta = Σ_d dout·out − dlse,
    dsink = −Σ_queries exp(sink − lse)·delta. Twin: the same formulas in PyTorch (`ops`' autograd)."""
    B, S, H, D = out.shape
    out, dout, lse = out.contiguous(), dout.contiguous(), lse.contiguous()
    delta = torch.empty(B, S, H, device=out.device, dtype=torch.float32)
    part = torch.empty(B, S, H, device=out.device, dtype=torch.float32)
    if B * S:
        dl = dlse.contiguous() if dlse is not None else lse
        _delta_kernel[(B * S,)](dout, out, lse, dl, sink, delta, part, H, D, HAS_DLSE=dlse is not None,
                                BLOCK_H=next_pow2(H), BLOCK_D=min(next_pow2(D), 128),
                                num_warps=1 if INTERPRET else 4, **pdl(dout))
    return delta, part.sum((0, 1)).to(sink.dtype)


def backward(q, kv, idx, sink, scale, out, lse, dout, kv2=None, rows2=None, dlse=None, block_n: int | None = None,
             num_warps: int | None = None, block_h: int | None = None, num_stages: int | None = None):
    """Gradients (dq, dkv, dkv2, dsink) of `forward`, given dout (and optionally dlse, the gradient of lse).
    Launch parameters left None take `_bwd_launch`'s choice."""
    if _is_kv8(kv2):
        raise ValueError("sparse_attention backward: FP8 entries (a decode cache) carry no gradient")
    B, S, H, D = q.shape
    dflt = _bwd_launch(H, q.dtype)
    block_n, num_warps = block_n or dflt["block_n"], num_warps or dflt["num_warps"]
    block_h, num_stages = block_h or dflt["block_h"], num_stages or dflt["num_stages"]
    K = idx.shape[-1]
    dout = dout.contiguous()
    delta, dsink = backward_terms(out, dout, lse, sink, dlse)                      # [B, S, H], [H]
    k2, r2, has2, _ = _kv2_args(q, kv, kv2, rows2, idx)
    dq = torch.empty_like(q)
    dkv = torch.zeros(kv.shape, device=q.device, dtype=torch.float32)
    dkv2 = torch.zeros(k2.shape, device=q.device, dtype=torch.float32) if has2 else dkv
    idx = idx if idx.stride(-1) == 1 else idx.contiguous()
    BH = block_h
    f32 = INTERPRET or q.dtype == torch.float32
    launch = {"num_stages": num_stages} if num_stages else {}
    if B * S:
        _bwd_kernel[(B * S, cdiv(H, BH))](
            q, kv, k2, r2, idx, dout, lse, delta, dq, dkv, dkv2,
            q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), k2.stride(0), k2.stride(1),
            idx.stride(0), idx.stride(1), dkv.stride(0), dkv.stride(1), dkv2.stride(0), dkv2.stride(1),
            S, H, kv.shape[1], K, scale,
            D=D, BLOCK_H=BH, BLOCK_N=block_n, HAS_KV2=has2, F32_DOT=f32, num_warps=num_warps, **launch, **pdl(q))
    return dq, dkv.to(kv.dtype), (dkv2.to(kv2.dtype) if has2 else None), dsink
