"""RMSNorm and partial interleaved RoPE in one pass over rows (twin: `dsv4.ops.norm_rope_torch`).

Each row x [Dh]: optionally y = x / sqrt(mean(x²) + eps) (· w), cast to the row's dtype (as the twin,
which rounds before the rotation), then the pairs (Dh − Dr + 2i, Dh − Dr + 2i + 1) of the last Dr dims
rotated by the angle (p · stride) · freqs[i] of the row's token position p, cos and sin computed in fp32
here (the twin computes the same product in fp32 before its cos/sin). Rows of one token share its
position (heads). Memory-bound: one read and one write per element instead of the ~8 passes of the
PyTorch form, and no angle tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET
from .launch import cdiv, launchable, next_pow2, pdl, pdl_start


@triton.jit
def _norm_rope_rows(prog, X, W, POS, FREQ, OUT, R, HEADS, eps, STRIDE, SIGN,
                    DH: tl.constexpr, DR2: tl.constexpr, NORM: tl.constexpr, WEIGHT: tl.constexpr,
                    ROPE: tl.constexpr, BLOCK_R: tl.constexpr):
    """Rows [prog·BLOCK_R, (prog+1)·BLOCK_R) of one problem (the body of both kernels below)."""
    r = prog * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < R
    d = tl.arange(0, DH)
    r64 = r.to(tl.int64)
    x = tl.load(X + r64[:, None] * DH + d[None, :], mask=rm[:, None], other=0.0).to(tl.float32)   # [BR, DH]
    if NORM:
        rs = 1.0 / tl.sqrt(tl.sum(x * x, 1) / DH + eps)
        x = x * rs[:, None]
        if WEIGHT:
            x = x * tl.load(W + d).to(tl.float32)[None, :]
    y = x.to(OUT.dtype.element_ty)
    if ROPE:
        NOPE: tl.constexpr = DH - 2 * DR2
        tl.store(OUT + r64[:, None] * DH + d[None, :], y, mask=rm[:, None] & (d < NOPE)[None, :])
        tok = (r // HEADS).to(tl.int64)
        p = tl.arange(0, DR2)
        at = (tl.load(POS + tok, mask=rm, other=0) * STRIDE).to(tl.float32)
        ang = at[:, None] * tl.load(FREQ + p).to(tl.float32)[None, :]                                # [BR, DR2]
        c = tl.cos(ang)
        s = tl.sin(ang) * SIGN
        # the pairs again, as the rounded values (the twin rotates the rounded normalised row)
        xe = tl.load(X + r64[:, None] * DH + NOPE + 2 * p[None, :], mask=rm[:, None], other=0.0).to(tl.float32)
        xo = tl.load(X + r64[:, None] * DH + NOPE + 2 * p[None, :] + 1, mask=rm[:, None], other=0.0).to(tl.float32)
        if NORM:
            xe = xe * rs[:, None]
            xo = xo * rs[:, None]
            if WEIGHT:
                xe = xe * tl.load(W + NOPE + 2 * p).to(tl.float32)[None, :]
                xo = xo * tl.load(W + NOPE + 2 * p + 1).to(tl.float32)[None, :]
        xe = xe.to(OUT.dtype.element_ty).to(tl.float32)
        xo = xo.to(OUT.dtype.element_ty).to(tl.float32)
        tl.store(OUT + r64[:, None] * DH + NOPE + 2 * p[None, :], (xe * c - xo * s).to(OUT.dtype.element_ty),
                 mask=rm[:, None])
        tl.store(OUT + r64[:, None] * DH + NOPE + 2 * p[None, :] + 1, (xe * s + xo * c).to(OUT.dtype.element_ty),
                 mask=rm[:, None])
    else:
        tl.store(OUT + r64[:, None] * DH + d[None, :], y, mask=rm[:, None])


@launchable
@triton.jit
def _norm_rope_kernel(X, W, POS, FREQ, OUT, R, HEADS, eps, STRIDE, SIGN,
                      DH: tl.constexpr, DR2: tl.constexpr, NORM: tl.constexpr, WEIGHT: tl.constexpr,
                      ROPE: tl.constexpr, BLOCK_R: tl.constexpr, PDL: tl.constexpr = False):
    pdl_start(PDL)
    _norm_rope_rows(tl.program_id(0), X, W, POS, FREQ, OUT, R, HEADS, eps, STRIDE, SIGN, DH, DR2, NORM, WEIGHT,
                    ROPE, BLOCK_R)


@launchable
@triton.jit
def _norm_rope_pair_kernel(X, W, POS, FREQ, OUT, R, HEADS, eps, STRIDE, SIGN,
                           X2, W2, POS2, FREQ2, OUT2, R2, HEADS2, eps2, STRIDE2, SIGN2, N_FIRST,
                           DH: tl.constexpr, DR2: tl.constexpr, NORM: tl.constexpr, WEIGHT: tl.constexpr,
                           ROPE: tl.constexpr, BLOCK_R: tl.constexpr,
                           DH_2: tl.constexpr, DR2_2: tl.constexpr, NORM_2: tl.constexpr, WEIGHT_2: tl.constexpr,
                           ROPE_2: tl.constexpr, BLOCK_R_2: tl.constexpr, PDL: tl.constexpr = False):
    """Two independent problems in one launch: programs [0, N_FIRST) the first, the rest the second."""
    pdl_start(PDL)
    prog = tl.program_id(0)
    if prog < N_FIRST:
        _norm_rope_rows(prog, X, W, POS, FREQ, OUT, R, HEADS, eps, STRIDE, SIGN, DH, DR2, NORM, WEIGHT, ROPE,
                        BLOCK_R)
    else:
        _norm_rope_rows(prog - N_FIRST, X2, W2, POS2, FREQ2, OUT2, R2, HEADS2, eps2, STRIDE2, SIGN2, DH_2, DR2_2,
                        NORM_2, WEIGHT_2, ROPE_2, BLOCK_R_2)


def _problem(x, weight, eps, pos, freqs, stride, sign, block_r):
    """(launch arguments, constexprs, output, programs) of one norm/rope problem."""
    Dh = x.shape[-1]
    if Dh & (Dh - 1):
        raise ValueError(f"norm/rope kernel: row width {Dh} must be a power of two")
    # ~8K values per program: 16 rows of 4,096 (V4-Flash's hidden size) spill 1.7 KB of registers (ptxas
    # for sm90: bench/ptxas_report.py), 30 µs a call on the H200
    block_r = block_r or (128 if INTERPRET else max(1, min(16, 8192 // Dh)))
    heads = x.shape[2] if x.dim() == 4 else 1
    xv = x.contiguous()
    out = torch.empty_like(xv)
    R = xv.numel() // Dh
    block_r = min(block_r, next_pow2(max(R, 1)))
    rope = pos is not None
    dr2 = freqs.shape[-1] if rope else 1
    if rope and dr2 & (dr2 - 1):
        raise ValueError(f"norm/rope kernel: rope pairs {dr2} must be a power of two")
    if rope and pos.numel() * heads != R:
        raise ValueError(f"norm/rope kernel: {pos.numel()} positions for {R // heads} tokens")
    pv = pos.contiguous() if rope else xv
    fv = freqs.contiguous() if rope else xv
    w = weight.contiguous() if weight is not None else xv
    args = (xv, w, pv, fv, out, R, heads, eps if eps is not None else 0.0, stride, float(sign))
    const = (Dh, dr2, eps is not None, weight is not None, rope, block_r)
    return args, const, out, cdiv(R, block_r)


def norm_rope(x, weight, eps, pos, freqs, stride: int = 1, sign: float = 1.0, block_r: int | None = None):
    """x [B, S, Dh] or [B, S, H, Dh]; weight [Dh] or None; eps None = no norm; pos [B, S] int and freqs
    [Dr/2] (pos None: no rope); sign −1 de-rotates."""
    args, (dh, dr2, norm, wt, rope, br), out, n = _problem(x, weight, eps, pos, freqs, stride, sign, block_r)
    if n:
        _norm_rope_kernel[(n,)](*args, DH=dh, DR2=dr2, NORM=norm, WEIGHT=wt, ROPE=rope, BLOCK_R=br, **pdl(out))
    return out


def norm_rope_pair(first: tuple, second: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Two `norm_rope` problems, each (x, weight, eps, pos, freqs, stride, sign), in one launch."""
    a1, (dh, dr2, norm, wt, rope, br), out1, n1 = _problem(*first, None)
    a2, (dh_2, dr2_2, norm_2, wt_2, rope_2, br_2), out2, n2 = _problem(*second, None)
    if n1 + n2:
        _norm_rope_pair_kernel[(n1 + n2,)](*a1, *a2, n1, DH=dh, DR2=dr2, NORM=norm, WEIGHT=wt, ROPE=rope, BLOCK_R=br,
                                          DH_2=dh_2, DR2_2=dr2_2, NORM_2=norm_2, WEIGHT_2=wt_2, ROPE_2=rope_2,
                                          BLOCK_R_2=br_2, **pdl(out1))
    return out1, out2


@launchable
@triton.jit
def _norm_rope_bwd_kernel(G, X, W, POS, FREQ, DX, DW, R, HEADS, eps, STRIDE, SIGN,
                          DH: tl.constexpr, DR2: tl.constexpr, NORM: tl.constexpr, WEIGHT: tl.constexpr,
                          ROPE: tl.constexpr, BLOCK_R: tl.constexpr, PDL: tl.constexpr = False):
    """Gradient of `_norm_rope_kernel` for BLOCK_R rows (the casts pass gradients through, as autograd's):
    the rotation's transpose on the pairs, then dx = rs · (gy·w − x̂ · mean(gy·w·x̂)) with x̂ = x · rs;
    this block's Σ gy·x̂ over its rows goes to DW[program] (summed after: deterministic)."""
    pdl_start(PDL)
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < R
    d = tl.arange(0, DH)
    r64 = r.to(tl.int64)
    NOPE: tl.constexpr = DH - 2 * DR2
    g = tl.load(G + r64[:, None] * DH + d[None, :], mask=rm[:, None], other=0.0).to(tl.float32)   # [BR, DH]
    if ROPE:
        tok = (r // HEADS).to(tl.int64)
        p = tl.arange(0, DR2)
        at = (tl.load(POS + tok, mask=rm, other=0) * STRIDE).to(tl.float32)
        ang = at[:, None] * tl.load(FREQ + p).to(tl.float32)[None, :]
        c = tl.cos(ang)
        s = tl.sin(ang) * SIGN
        pe = r64[:, None] * DH + NOPE + 2 * p[None, :]
        ge = tl.load(G + pe, mask=rm[:, None], other=0.0).to(tl.float32)
        go = tl.load(G + pe + 1, mask=rm[:, None], other=0.0).to(tl.float32)
        ye = ge * c + go * s                      # the rotation's transpose
        yo = go * c - ge * s
    if NORM:
        x = tl.load(X + r64[:, None] * DH + d[None, :], mask=rm[:, None], other=0.0).to(tl.float32)
        rs = 1.0 / tl.sqrt(tl.sum(x * x, 1) / DH + eps)
        xh = x * rs[:, None]
        if WEIGHT:
            w = tl.load(W + d).to(tl.float32)[None, :]
        else:
            w = tl.full((1, DH), 1.0, tl.float32)
        if ROPE:
            keep = (d < NOPE)[None, :]
            xe = tl.load(X + pe, mask=rm[:, None], other=0.0).to(tl.float32) * rs[:, None]
            xo = tl.load(X + pe + 1, mask=rm[:, None], other=0.0).to(tl.float32) * rs[:, None]
            if WEIGHT:
                we = tl.load(W + NOPE + 2 * p).to(tl.float32)[None, :]
                wo = tl.load(W + NOPE + 2 * p + 1).to(tl.float32)[None, :]
            else:
                we = tl.full((1, DR2), 1.0, tl.float32)
                wo = tl.full((1, DR2), 1.0, tl.float32)
            gn = tl.where(keep, g, 0.0)
            dot = tl.sum(gn * w * xh, 1) + tl.sum(ye * we * xe + yo * wo * xo, 1)
            m = (dot / DH)[:, None]
            tl.store(DX + r64[:, None] * DH + d[None, :], ((gn * w - xh * m) * rs[:, None]).to(DX.dtype.element_ty),
                     mask=rm[:, None] & keep)
            tl.store(DX + pe, ((ye * we - xe * m) * rs[:, None]).to(DX.dtype.element_ty), mask=rm[:, None])
            tl.store(DX + pe + 1, ((yo * wo - xo * m) * rs[:, None]).to(DX.dtype.element_ty), mask=rm[:, None])
            if WEIGHT:
                tl.store(DW + pid * DH + d, tl.sum(gn * xh, 0), mask=d < NOPE)
                tl.store(DW + pid * DH + NOPE + 2 * p, tl.sum(ye * xe, 0))
                tl.store(DW + pid * DH + NOPE + 2 * p + 1, tl.sum(yo * xo, 0))
        else:
            m = (tl.sum(g * w * xh, 1) / DH)[:, None]
            tl.store(DX + r64[:, None] * DH + d[None, :], ((g * w - xh * m) * rs[:, None]).to(DX.dtype.element_ty),
                     mask=rm[:, None])
            if WEIGHT:
                tl.store(DW + pid * DH + d, tl.sum(g * xh, 0))
    else:   # rotation only
        tl.store(DX + r64[:, None] * DH + d[None, :], g.to(DX.dtype.element_ty), mask=rm[:, None] & (d < NOPE)[None, :])
        tl.store(DX + pe, ye.to(DX.dtype.element_ty), mask=rm[:, None])
        tl.store(DX + pe + 1, yo.to(DX.dtype.element_ty), mask=rm[:, None])


def norm_rope_backward(grad, x, weight, eps, pos, freqs, stride: int = 1, sign: float = 1.0,
                       block_r: int | None = None):
    """(dx in x's dtype, dweight fp32 or None) of `norm_rope(x, weight, eps, pos, freqs, stride, sign)` for
    the output gradient `grad` (same shape as x)."""
    Dh = x.shape[-1]
    block_r = block_r or (128 if INTERPRET else max(1, min(16, 8192 // Dh)))
    heads = x.shape[2] if x.dim() == 4 else 1
    xv, gv = x.contiguous(), grad.contiguous()
    R = xv.numel() // Dh
    block_r = min(block_r, next_pow2(max(R, 1)))
    rope = pos is not None
    if eps is None and not rope:
        return grad.to(x.dtype), None
    dx = torch.empty_like(xv)
    n_prog = cdiv(R, block_r)
    want_dw = weight is not None and eps is not None
    dw = torch.empty(n_prog, Dh, device=x.device, dtype=torch.float32) if want_dw else dx
    pv = pos.contiguous() if rope else xv
    fv = freqs.contiguous() if rope else xv
    w = weight.contiguous() if weight is not None else xv
    if R:
        _norm_rope_bwd_kernel[(n_prog,)](gv, xv, w, pv, fv, dx, dw, R, heads, eps if eps is not None else 0.0,
                                        stride, float(sign), DH=Dh, DR2=freqs.shape[-1] if rope else 1,
                                        NORM=eps is not None, WEIGHT=weight is not None, ROPE=rope,
                                        BLOCK_R=block_r, **pdl(gv))
    return dx, (dw.sum(0) if want_dw and R else (torch.zeros(Dh, device=x.device) if want_dw else None))
