"""Lightning-indexer scores over a block of queries × a block of entries, and the top-k on them
(twin: `dsv4.ops.index_topk_torch`).

I[t, s] = Σ_h w[t, h] · ReLU(q[t, h] · k[s]) for entries s ∈ [lo_t, hi_t) (−inf elsewhere). One program
computes a BLOCK_S × BLOCK_C tile: the key tile is loaded once and reused by every head (a `tl.dot` per
head: BLOCK_S queries × Di × BLOCK_C entries), ReLU, weight and sum in fp32 registers. Tiles whose
entries are all invisible skip the arithmetic. FLOPs: 2·Hi·Di per (query, visible-tile entry).
The top-k runs on the score matrix with `torch.topk` (bf16 scores for bf16 inputs).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET


@triton.jit
def _scores_kernel(Q, K, W, ROWS, LO, HI, OUT,
                   s_qb, s_qs, s_qh, s_kb, s_kc, s_wb, s_ws, s_ob, s_os,
                   S, C, HI_N,
                   DI: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, F32_DOT: tl.constexpr):
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


def scores(q, k, w, lo, hi, k_rows=None, block_s: int = 64, block_c: int = 64, num_warps: int = 4):
    """I [B, S, C] with −inf outside [lo, hi), accumulated in fp32 and stored in bf16 for bf16 inputs (as
    the official code's bf16 index scores; it halves the top-k's traffic), else fp32. q [B, S, Hi, Di];
    k [B2, C, Di] (row k_rows[b]); w [B, S, Hi]; lo, hi [B, S] int."""
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
    lo, hi = lo.contiguous(), hi.contiguous()                 # any integer dtype (loaded as is)
    f32 = INTERPRET or q.dtype == torch.float32
    grid = (triton.cdiv(S, block_s), triton.cdiv(C, block_c), B)
    _scores_kernel[grid](q, k, w, rows, lo, hi, out,
                         q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), w.stride(0), w.stride(1),
                         out.stride(0), out.stride(1), S, C, Hi,
                         DI=Di, BLOCK_S=block_s, BLOCK_C=block_c, F32_DOT=f32, num_warps=num_warps)
    return out


def topk(q, k, w, lo, hi, topk: int, k_rows=None) -> torch.Tensor:
    """idx [B, S, P] int32 (−1 where fewer than P entries are visible), P = min(topk, C)."""
    sc = scores(q, k, w, lo, hi, k_rows)
    top = sc.topk(min(topk, sc.shape[-1]), dim=-1)
    return torch.where(top.values == float("-inf"), -1, top.indices).to(torch.int32)
