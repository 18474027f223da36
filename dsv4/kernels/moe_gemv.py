"""Routed experts for a few tokens (a decode step) as two GEMV launches over (token, expert) pairs, on
weights in the model dtype (twin: `dsv4.ops.moe_experts_loop`; the FP4 form is `fp4_moe`).

Pair p = (token p // K, expert idx[p]): the up launch computes h[p] = w[p] · SwiGLU(W1[e] x, W3[e] x)
for a tile of I rows per program (fp32 sums, the clamp and SwiGLU in fp32, h stored in x's dtype as
the twin's), the down launch, per token and tile of D rows, the K products W2[e] h[p] rounded to x's
dtype and summed (fp32, one final rounding, as the twin's sum in x's dtype). No sorting, no host read,
static shapes: one program reads only its expert's rows, so a step reads each used expert's weights
once per pair (as the grouped path does at K distinct experts per token). Pairs with an id outside
[0, E) contribute nothing.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET
from .launch import cdiv, launchable, pdl, pdl_start


@launchable
@triton.jit
def _up_kernel(x_ptr, w1_ptr, w3_ptr, rw_ptr, idx_ptr, h_ptr, D, I, TOPK, E, limit,
               s_xm, s_we, s_wn, s_hm, HAS_LIMIT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               PDL: tl.constexpr = False):
    pdl_start(PDL)
    p, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(idx_ptr + p).to(tl.int64)
    if (e >= 0) & (e < E):
        tok = (p // TOPK).to(tl.int64)
        rn = pid_n * BN + tl.arange(0, BN)
        n_ok = rn < I
        k = tl.arange(0, BK)
        acc_g = tl.zeros([BN, BK], tl.float32)
        acc_u = tl.zeros([BN, BK], tl.float32)
        row = e * s_we + rn[:, None].to(tl.int64) * s_wn
        for k0 in range(0, D, BK):
            kk = k0 + k
            km = kk < D
            xv = tl.load(x_ptr + tok * s_xm + kk, mask=km, other=0.0).to(tl.float32)[None, :]
            m = n_ok[:, None] & km[None, :]
            acc_g += tl.load(w1_ptr + row + kk[None, :], mask=m, other=0.0).to(tl.float32) * xv
            acc_u += tl.load(w3_ptr + row + kk[None, :], mask=m, other=0.0).to(tl.float32) * xv
        g = tl.sum(acc_g, 1)
        u = tl.sum(acc_u, 1)
        if HAS_LIMIT:
            u = tl.minimum(tl.maximum(u, -limit), limit)
            g = tl.minimum(g, limit)
        h = g / (1.0 + tl.exp(-g)) * u * tl.load(rw_ptr + p).to(tl.float32)
        tl.store(h_ptr + p.to(tl.int64) * s_hm + rn, h.to(h_ptr.dtype.element_ty), mask=n_ok)


@launchable
@triton.jit
def _down_kernel(h_ptr, w2_ptr, idx_ptr, out_ptr, D, I, TOPK, E, s_hm, s_we, s_wn, s_om,
                 BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr = False):
    """out[token, n-tile] = Σ_k round(W2[e_k] h[pair k]), each pair's output rounded to out's dtype and
    the K of them summed in fp32 then rounded once (as the twin's cast-then-sum)."""
    pdl_start(PDL)
    tok, pid_n = tl.program_id(0).to(tl.int64), tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    n_ok = rn < D
    k = tl.arange(0, BK)
    total = tl.zeros([BN], tl.float32)
    for j in range(0, TOPK):
        r = tok * TOPK + j
        e = tl.load(idx_ptr + r).to(tl.int64)
        if (e >= 0) & (e < E):
            acc = tl.zeros([BN, BK], tl.float32)
            row = e * s_we + rn[:, None].to(tl.int64) * s_wn
            for k0 in range(0, I, BK):
                kk = k0 + k
                km = kk < I
                hv = tl.load(h_ptr + r * s_hm + kk, mask=km, other=0.0).to(tl.float32)[None, :]
                w = tl.load(w2_ptr + row + kk[None, :], mask=n_ok[:, None] & km[None, :], other=0.0)
                acc += w.to(tl.float32) * hv
            total += tl.sum(acc, 1).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + tok * s_om + rn, total.to(out_ptr.dtype.element_ty), mask=n_ok)


def experts_gemv(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                 w3: torch.Tensor, limit: float, bn: int | None = None, bk: int | None = None,
                 warps: int | None = None, bn_down: int | None = None) -> torch.Tensor:
    """x [N, D]; idx [N, K]; weight [N, K]; w1, w3 [E, I, D]; w2 [E, D, I] (last dim contiguous). -> [N, D].
    bn, bk: rows and columns of a program's weight tile (bn_down: the down launch's rows, default bn);
    warps: warps per program. The GPU default, 2 rows × 512 columns at 2 warps, took the bench preset's
    step (16 experts of 512 × 1,024, top-2) from 11.1 to 5.8 µs at one token and from 15.1 to 10.2 at
    four on an H200 against 8 × 256 at 4 warps (`bench/probe_moe_gemv.py`): more, smaller programs."""
    bn = bn or (16 if INTERPRET else 2)
    bk = bk or (64 if INTERPRET else 512)
    warps = warps or (4 if INTERPRET else 2)
    N, K = idx.shape
    E, I, D = w1.shape
    if w1.stride(-1) != 1 or w2.stride(-1) != 1 or w3.stride(-1) != 1 or w1.stride() != w3.stride():
        raise ValueError("experts GEMV kernel: expert matrices need a contiguous last dim (w1 and w3 alike)")
    x = x.contiguous()
    out = torch.empty(N, D, device=x.device, dtype=x.dtype)
    if N * K == 0:
        return out.zero_()
    h = torch.empty(N * K, I, device=x.device, dtype=x.dtype)
    flat = idx.reshape(-1).contiguous()
    rw = weight.reshape(-1).contiguous()
    _up_kernel[(N * K, cdiv(I, bn))](x, w1, w3, rw, flat, h, D, I, K, E, float(limit),
                                            x.stride(0), w1.stride(0), w1.stride(1), h.stride(0),
                                            HAS_LIMIT=limit > 0, BN=bn, BK=bk, num_warps=warps, **pdl(x))
    bnd = bn_down or bn
    _down_kernel[(N, cdiv(D, bnd))](h, w2, flat, out, D, I, K, E, h.stride(0), w2.stride(0), w2.stride(1),
                                           out.stride(0), BN=bnd, BK=bk, num_warps=warps, **pdl(h))
    return out
