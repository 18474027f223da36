"""Lightning-indexer scores over a block of queries × a block of entries, and the top-k on them
(twin: `dsv4.ops.index_topk_torch`).

I[t, s] = Σ_h w[t, h] · ReLU(q[t, h] · k[s]) for entries s ∈ [lo_t, hi_t) (−inf elsewhere). One program
computes a BLOCK_S × BLOCK_C tile: the key tile is loaded once and reused by every head (a `tl.dot` per
head: BLOCK_S queries × Di × BLOCK_C entries), ReLU, weight and sum in fp32 registers. Tiles whose
entries are all invisible skip the arithmetic. FLOPs: 2·Hi·Di per (query, visible-tile entry).
The top-k then runs on the score matrix (bf16 scores for bf16 inputs) as a radix select, one program per
row (`select`): 8 bits of the scores per pass find the P-th largest value exactly (2 passes for bf16,
4 for fp32), and a last pass writes the entries above it and the first ties at it, in index order. It
reads a row 3 (bf16) or 5 times and sorts nothing; `torch.topk` sorts. Only the entries [lo, hi) of a
row are read. Rows longer than 16K entries (contexts past 64K tokens) stay with `torch.topk`
(`use_select`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET
from .launch import cdiv, launchable, next_pow2, pdl, pdl_start


@launchable
@triton.jit
def _scores_kernel(Q, K, W, ROWS, LO, HI, OUT,
                   s_qb, s_qs, s_qh, s_kb, s_kc, s_wb, s_ws, s_ob, s_os,
                   S, C, HI_N,
                   DI: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, F32_DOT: tl.constexpr,
                   PDL: tl.constexpr = False):
    pdl_start(PDL)
    b = tl.program_id(2)
    ts = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    smask = ts < S
    lo = tl.load(LO + b * S + ts, mask=smask, other=0)
    hi = tl.load(HI + b * S + ts, mask=smask, other=0)
    c0 = tl.program_id(1) * BLOCK_C
    visible = (cs[None, :] >= lo[:, None]) & (cs[None, :] < hi[:, None]) & smask[:, None]
    acc = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    if (c0 < tl.max(tl.where(smask, hi, 0))) & (c0 + BLOCK_C > tl.min(tl.where(smask, lo, C))):
        r = tl.load(ROWS + b).to(tl.int64)
        d = tl.arange(0, DI)
        k = tl.load(K + r * s_kb + cs[:, None].to(tl.int64) * s_kc + d[None, :], mask=(cs < C)[:, None], other=0.0)
        if F32_DOT:
            k = k.to(tl.float32)
        qrow = Q + b.to(tl.int64) * s_qb + ts[:, None].to(tl.int64) * s_qs + d[None, :]
        for h in range(0, HI_N):
            q = tl.load(qrow + h * s_qh, mask=smask[:, None], other=0.0)
            w = tl.load(W + b.to(tl.int64) * s_wb + ts.to(tl.int64) * s_ws + h, mask=smask, other=0.0).to(tl.float32)
            if F32_DOT:
                dots = tl.dot(q.to(tl.float32), tl.trans(k), input_precision="ieee")
            else:
                dots = tl.dot(q, tl.trans(k))
            acc += tl.maximum(dots, 0.0) * w[:, None]
    out = tl.where(visible, acc, float("-inf"))
    tl.store(OUT + b.to(tl.int64) * s_ob + ts[:, None].to(tl.int64) * s_os + cs[None, :], out.to(OUT.dtype.element_ty),
             mask=smask[:, None] & (cs < C)[None, :])


@launchable
@triton.jit
def _scores_few_kernel(Q, K, W, ROWS, LO, HI, OUT,
                       s_qb, s_qs, s_qh, s_kb, s_kc, s_wb, s_ws, s_ob, s_os,
                       S, C, HI_N, w_scale, DI: tl.constexpr, HP: tl.constexpr, BLOCK_C: tl.constexpr,
                       F32_DOT: tl.constexpr, RATIO: tl.constexpr = 0, PDL: tl.constexpr = False):
    """`_scores_kernel` for a few queries (decode): one program per (query, block of entries), the heads
    as the rows of one `tl.dot` ([HP heads, Di] · [Di, BLOCK_C], heads past Hi loaded as zeros with zero
    weight) instead of a dot per head over a block of mostly absent queries. The head weights are
    W · w_scale in fp32. RATIO > 0: LO holds the queries' positions p and the range is [0, min((p + 1) //
    RATIO, C)) (a decode step's visible entries; HI unused)."""
    pdl_start(PDL)
    t = tl.program_id(0)
    b = tl.program_id(2)
    c0 = tl.program_id(1) * BLOCK_C
    cs = c0 + tl.arange(0, BLOCK_C)
    if RATIO > 0:
        lo = 0
        hi = tl.minimum((tl.load(LO + b * S + t) + 1) // RATIO, C)
    else:
        lo = tl.load(LO + b * S + t)
        hi = tl.load(HI + b * S + t)
    acc = tl.zeros([BLOCK_C], tl.float32)
    if (c0 < hi) & (c0 + BLOCK_C > lo):
        r = tl.load(ROWS + b).to(tl.int64)
        d = tl.arange(0, DI)
        h = tl.arange(0, HP)
        k = tl.load(K + r * s_kb + cs[:, None].to(tl.int64) * s_kc + d[None, :], mask=(cs < C)[:, None], other=0.0)
        qrow = Q + b.to(tl.int64) * s_qb + t.to(tl.int64) * s_qs
        q = tl.load(qrow + h[:, None] * s_qh + d[None, :], mask=(h < HI_N)[:, None], other=0.0)       # [HP, Di]
        w = tl.load(W + b.to(tl.int64) * s_wb + t.to(tl.int64) * s_ws + h, mask=h < HI_N, other=0.0).to(tl.float32)
        w = w * w_scale
        if F32_DOT:
            dots = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            dots = tl.dot(q, tl.trans(k))                                                           # [HP, BC]
        acc = tl.sum(tl.maximum(dots, 0.0) * w[:, None], 0)
    out = tl.where((cs >= lo) & (cs < hi), acc, float("-inf"))
    tl.store(OUT + b.to(tl.int64) * s_ob + t.to(tl.int64) * s_os + cs, out.to(OUT.dtype.element_ty), mask=cs < C)


FEW_QUERIES = 8          # at most this many queries per row take `_scores_few_kernel`
FEW_BLOCK_C = 32         # its entries per program


def scores(q, k, w, lo, hi, k_rows=None, block_s: int = 64, block_c: int = 64, num_warps: int = 4,
           few: bool | None = None, w_scale: float = 1.0, ratio: int = 0):
    """I [B, S, C] with −inf outside [lo, hi), accumulated in fp32 and stored in bf16 for bf16 inputs (as
    the official code's bf16 index scores; it halves the top-k's traffic), else fp32. q [B, S, Hi, Di];
    k [B2, C, Di] (row k_rows[b]); w [B, S, Hi] (times w_scale in fp32); lo, hi [B, S] int. `few`: the
    few-query kernel (heads as the rows of one dot; default for S <= FEW_QUERIES, where a block of 64
    queries would hold mostly padding and its per-head loop runs serially). ratio > 0: lo holds the
    positions p and the range is [0, min((p + 1) // ratio, C)) (hi unused; computed in the kernel)."""
    B, S, Hi, Di = q.shape
    C = k.shape[1]
    if Di & (Di - 1) or Di < 16:
        raise ValueError(f"index scores kernel: index head dim {Di} must be a power of two >= 16")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("index scores kernel: the last dim of q and k must be contiguous")
    if k.dtype != q.dtype:
        k = k.to(q.dtype)
    out = torch.empty(B, S, C, device=q.device, dtype=torch.bfloat16 if q.dtype == torch.bfloat16 else torch.float32)
    if B * S * C == 0:
        return out
    rows = k_rows if k_rows is not None else torch.arange(B, device=q.device)
    few = few if few is not None else S <= FEW_QUERIES
    if ratio and not few:                                     # (the tiled kernel takes the range as tensors)
        lo, hi = torch.zeros_like(lo), torch.clamp((lo + 1) // ratio, max=C)
    if w_scale != 1.0 and not few:
        w, w_scale = w.float() * w_scale, 1.0
    lo = lo.contiguous()                                      # any integer dtype (loaded as is)
    hi = lo if hi is None else hi.contiguous()
    f32 = INTERPRET or q.dtype == torch.float32
    if few:
        bc = FEW_BLOCK_C
        _scores_few_kernel[(S, cdiv(C, bc), B)](
            q, k, w, rows, lo, hi, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
            w.stride(0), w.stride(1), out.stride(0), out.stride(1), S, C, Hi, float(w_scale),
            DI=Di, HP=max(16, next_pow2(Hi)), BLOCK_C=bc, F32_DOT=f32, RATIO=ratio, num_warps=num_warps, **pdl(q))
        return out
    grid = (cdiv(S, block_s), cdiv(C, block_c), B)
    _scores_kernel[grid](q, k, w, rows, lo, hi, out,
                         q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), w.stride(0), w.stride(1),
                         out.stride(0), out.stride(1), S, C, Hi,
                         DI=Di, BLOCK_S=block_s, BLOCK_C=block_c, F32_DOT=f32, num_warps=num_warps, **pdl(q))
    return out


def topk(q, k, w, lo, hi, topk: int, k_rows=None, long_rows=None, w_scale: float = 1.0,
         ratio: int = 0) -> torch.Tensor:
    """idx [B, S, P] int32 (−1 where fewer than P entries are visible), P = min(topk, C): the scores
    kernel, then the radix-select kernel (`select`), or for a few very long rows `long_rows(scores, P)`
    (the caller's PyTorch choice with the same tie rule; default `torch.topk`, whose choice among equal
    scores is arbitrary). w_scale, ratio: as `scores` (ratio > 0: lo holds positions, hi is unused)."""
    sc = scores(q, k, w, lo, hi, k_rows, w_scale=w_scale, ratio=ratio)
    B, S, C = sc.shape
    if use_select(B * S, C):
        return select(sc, topk, lo, hi, ratio=ratio)
    if long_rows is not None:
        return long_rows(sc, topk)
    top = sc.topk(min(topk, C), dim=-1)
    return torch.where(top.values == float("-inf"), -1, top.indices).to(torch.int32)


SELECT_MAX_ENTRIES = 16384   # rows up to 64K tokens of context (ratio 4); longer rows go to torch.topk


def use_select(rows: int, entries: int) -> bool:
    """Whether the radix-select kernel serves a top-k over `rows` rows of `entries` scores. It runs one
    program per row, reading the row 3-5 times: a few very long rows (decode at long context) are left
    to `torch.topk`, which spreads one row over the whole GPU, and so are the long rows of prefills
    past 64K tokens until the kernel is timed there (`bench_kernels.py --only select`)."""
    return entries <= SELECT_MAX_ENTRIES


# ----------------------------------------------------------------------------- top-k by radix select
@triton.jit
def _orderable_key(bits, NBITS: tl.constexpr):
    """Float bits (sign-extended int32) -> an unsigned key in [0, 2^NBITS) that orders as the floats
    compare: positive values get the sign bit set, negative values are inverted, and −0 is +0 (equal
    floats, one key: the ReLU scores of the indexer hold both, and a tie between them must be a tie)."""
    if NBITS == 16:
        bits = tl.where(bits == -32768, 0, bits)
        key = tl.where(bits < 0, ~bits, bits | 0x8000) & 0xFFFF
    else:
        bits = tl.where(bits == -2147483648, 0, bits)
        key = tl.where(bits < 0, ~bits, bits | -2147483648)
    return key.to(tl.uint32, bitcast=True)


@launchable
@triton.jit
def _select_kernel(SC, LO, HI, OUT, s_sr, s_or, C, P,
                   NBITS: tl.constexpr, NEG_KEY: tl.constexpr, BLOCK: tl.constexpr, HAS_RANGE: tl.constexpr,
                   RATIO: tl.constexpr = 0, PDL: tl.constexpr = False):
    """One row: the P largest scores among entries [lo, hi) (all C without a range), written as their
    indices in increasing order, then −1 for the rest and for −inf scores. Radix select on the scores'
    bits, 8 bits per pass (2 passes for bf16, 4 for fp32): each pass histograms the next byte of the
    entries whose higher bytes equal the threshold's so far, and keeps the byte where the count of larger
    entries reaches P. The last pass writes every entry above the threshold and the first of the ties
    at it (lowest index first; `torch.topk` picks among ties in no set order)."""
    pdl_start(PDL)
    r = tl.program_id(0).to(tl.int64)
    row = SC + r * s_sr
    if HAS_RANGE and RATIO > 0:      # LO holds the row's position p: entries [0, (p + 1) // RATIO)
        lo = 0
        hi = tl.minimum(((tl.load(LO + r) + 1) // RATIO).to(tl.int32), C)
    elif HAS_RANGE:
        lo = tl.load(LO + r).to(tl.int32)
        hi = tl.minimum(tl.load(HI + r).to(tl.int32), C)
    else:
        lo = 0
        hi = C
    c0 = (lo // BLOCK) * BLOCK
    offs = tl.arange(0, BLOCK)
    digits = tl.arange(0, 256)
    need = tl.minimum(P, hi - lo)                              # a range may hold fewer than P entries
    prefix = tl.full((), 0, tl.uint32)
    for p in tl.static_range(NBITS // 8):
        shift = NBITS - 8 * (p + 1)
        hist = tl.zeros((256,), tl.int32)
        for start in range(c0, hi, BLOCK):
            c = start + offs
            ok = (c >= lo) & (c < hi)
            key = _orderable_key(tl.load(row + c, mask=ok, other=0).to(tl.int32), NBITS)
            if p > 0:
                ok = ok & ((key >> (shift + 8)) == prefix)
            hist += tl.histogram(((key >> shift) & 0xFF).to(tl.int32), 256, mask=ok)
        above_or_at = tl.cumsum(hist, 0, reverse=True)         # entries whose byte is >= each digit
        b = tl.max(tl.where(above_or_at >= need, digits, -1), 0)
        need -= tl.sum(tl.where(digits > b, hist, 0), 0)
        prefix = (prefix << 8) | b.to(tl.uint32)
    # prefix is the P-th largest key; `need` (≥ 1) of the entries equal to it are taken
    out = OUT + r * s_or
    written = 0
    ties = 0
    for start in range(c0, hi, BLOCK):
        c = start + offs
        ok = (c >= lo) & (c < hi)
        key = _orderable_key(tl.load(row + c, mask=ok, other=0).to(tl.int32), NBITS)
        eq = ok & (key == prefix)
        tie_rank = ties + tl.cumsum(eq.to(tl.int32), 0) - 1
        take = ok & ((key > prefix) | (eq & (tie_rank < need))) & (key > NEG_KEY)
        slot = written + tl.cumsum(take.to(tl.int32), 0) - 1
        tl.store(out + slot, c, mask=take)
        written += tl.sum(take.to(tl.int32), 0)
        ties += tl.sum(eq.to(tl.int32), 0)
    for start in range(written, P, BLOCK):
        j = start + offs
        tl.store(out + j, -1, mask=j < P)


def select(scores: torch.Tensor, topk: int, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None,
           block: int | None = None, num_warps: int | None = None, ratio: int = 0) -> torch.Tensor:
    """idx [..., P] int32, P = min(topk, C): the indices of the P largest of each row of scores [..., C]
    (bf16 or fp32) among entries [lo, hi) when given (per row, [...] ints), in increasing index order;
    −1 for −inf scores and past the row's candidates. The same sets as `torch.topk` up to ties at the
    threshold (the lowest indices are taken). ratio > 0: lo holds positions p and the range is [0,
    min((p + 1) // ratio, C)) (hi unused)."""
    if scores.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"top-k kernel: scores must be bf16 or fp32, got {scores.dtype}")
    *lead, C = scores.shape
    P = min(topk, C)
    sc = scores.reshape(-1, C)
    if sc.stride(-1) != 1:
        sc = sc.contiguous()
    R = sc.shape[0]
    out = torch.empty(R, P, dtype=torch.int32, device=scores.device)
    if R * P == 0:
        return out.view(*lead, P)
    if block is None:   # the row in as few steps as a program holds well (16 values per thread at most)
        # the largest power of two <= C (a decode cache's capacity is a little past the context: 2,068
        # entries took 12.1 us in one block of 4,096 and 8.6 in blocks of 2,048, which the loop to the
        # row's end then runs once; H200, bench/probe_flash_decode.py)
        block = 256 if INTERPRET else min(4096, max(256, 1 << (C.bit_length() - 1)))
    if num_warps is None:
        num_warps = 8 if block >= 2048 else 4
    bits = sc.view(torch.int16 if sc.dtype == torch.bfloat16 else torch.int32)
    nbits = 16 if sc.dtype == torch.bfloat16 else 32
    neg_key = 0x7F if nbits == 16 else 0x7FFFFF                 # the key of −inf
    has_range = lo is not None
    lo_ = lo.reshape(-1).contiguous() if has_range else out
    hi_ = hi.reshape(-1).contiguous() if has_range and not ratio else lo_
    _select_kernel[(R,)](bits, lo_, hi_, out, bits.stride(0), out.stride(0), C, P,
                         NBITS=nbits, NEG_KEY=neg_key, BLOCK=block, HAS_RANGE=has_range, RATIO=ratio,
                         num_warps=num_warps, **pdl(bits))
    return out.view(*lead, P)
