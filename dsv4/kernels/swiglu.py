"""Clamped SwiGLU with the routing weight and the output cast in one pass (spec §8.4).

    h = silu(min(g, limit)) · clamp(u, −limit, limit) · w[row]      (fp32), stored in the output dtype

In a decode step this is eight elementwise kernels in PyTorch (two casts, two clamps, silu, two
products, a cast) for every expert call; here one. Twin: `dsv4.ops.swiglu_act_torch`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET
from .launch import cdiv, launchable, next_pow2, pdl, pdl_start


@launchable
@triton.jit
def _swiglu_kernel(G, U, W, OUT, n, I, limit, HAS_W: tl.constexpr, HAS_LIMIT: tl.constexpr, BLOCK: tl.constexpr,
                   PDL: tl.constexpr = False):
    pdl_start(PDL)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    g = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_LIMIT:
        u = tl.minimum(tl.maximum(u, -limit), limit)
        g = tl.minimum(g, limit)
    h = g / (1.0 + tl.exp(-g)) * u
    if HAS_W:
        h = h * tl.load(W + offs // I, mask=m, other=0.0).to(tl.float32)
    tl.store(OUT + offs, h.to(OUT.dtype.element_ty), mask=m)


def swiglu(g: torch.Tensor, u: torch.Tensor, limit: float, weight: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """g, u [..., I] (same shape and dtype); weight [rows] fp32 or None; -> [..., I] in out_dtype
    (default fp32)."""
    if g.shape != u.shape:
        raise ValueError(f"swiglu kernel: gate {tuple(g.shape)} and up {tuple(u.shape)} must have one shape")
    g, u = g.contiguous(), u.contiguous()
    I = g.shape[-1]
    out = torch.empty(g.shape, device=g.device, dtype=out_dtype or torch.float32)
    n = g.numel()
    if n:
        w = weight.reshape(-1).contiguous() if weight is not None else g
        if weight is not None and w.numel() * I != n:
            raise ValueError(f"swiglu kernel: {w.numel()} row weights for {n // I} rows")
        block = 1024
        _swiglu_kernel[(cdiv(n, block),)](g, u, w, out, n, I, float(limit), HAS_W=weight is not None,
                                                 HAS_LIMIT=limit > 0, BLOCK=block,
                                                 num_warps=1 if INTERPRET else 4, **pdl(g))
    return out


@launchable
@triton.jit
def _swiglu_bwd_kernel(G, U, W, DY, DG, DU, DW, rows, I, limit, HAS_W: tl.constexpr, HAS_LIMIT: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr, PDL: tl.constexpr = False):
    """Gradients of h = silu(min(g, limit)) · clamp(u, ±limit) · w for BLOCK_R rows: dg, du in the inputs'
    dtype; dw [rows] fp32 = Σ_i dy · silu · clamp(u) (one program holds whole rows, so no atomics). A
    clamp passes the gradient where its input lies inside the bounds, ends included (as torch.clamp)."""
    pdl_start(PDL)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < rows
    base = r.to(tl.int64)[:, None] * I
    if HAS_W:
        w = tl.load(W + r, mask=rm, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_R], tl.float32)
    for i0 in range(0, I, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        m = rm[:, None] & (i < I)[None, :]
        off = base + i[None, :]
        g = tl.load(G + off, mask=m, other=0.0).to(tl.float32)
        u = tl.load(U + off, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + off, mask=m, other=0.0).to(tl.float32)
        gc, uc = g, u
        if HAS_LIMIT:
            gc = tl.minimum(g, limit)
            uc = tl.minimum(tl.maximum(u, -limit), limit)
        s = 1.0 / (1.0 + tl.exp(-gc))
        silu = gc * s
        if HAS_W:
            dw += tl.sum(dy * silu * uc, 1)
            dy = dy * w[:, None]
        dgc = dy * uc * (s * (1.0 + gc * (1.0 - s)))
        duc = dy * silu
        if HAS_LIMIT:
            dgc = tl.where(g <= limit, dgc, 0.0)
            duc = tl.where((u >= -limit) & (u <= limit), duc, 0.0)
        tl.store(DG + off, dgc.to(DG.dtype.element_ty), mask=m)
        tl.store(DU + off, duc.to(DU.dtype.element_ty), mask=m)
    if HAS_W:
        tl.store(DW + r, dw, mask=rm)


def swiglu_backward(g: torch.Tensor, u: torch.Tensor, limit: float, weight: torch.Tensor | None,
                    dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dg, du, dweight) of `swiglu` given the output's gradient dy (any float dtype, g's shape): dg, du
    in g's dtype, dweight [rows] fp32 (None without a weight)."""
    I = g.shape[-1]
    rows = g.numel() // I if I else 0
    g, u, dy = g.contiguous(), u.contiguous(), dy.contiguous()
    dg, du = torch.empty_like(g), torch.empty_like(u)
    dw = torch.empty(rows, device=g.device, dtype=torch.float32) if weight is not None else None
    if rows and I:
        w = weight.reshape(-1).contiguous() if weight is not None else g
        block_i = min(next_pow2(I), 128 if INTERPRET else 256)
        block_r = 16 if INTERPRET else 8
        _swiglu_bwd_kernel[(cdiv(rows, block_r),)](g, u, w, dy, dg, du, dw if dw is not None else g, rows, I,
                                                          float(limit), HAS_W=weight is not None,
                                                          HAS_LIMIT=limit > 0, BLOCK_R=block_r, BLOCK_I=block_i,
                                                          num_warps=1 if INTERPRET else 4, **pdl(g))
    return dg, du, dw


class SwigluFn(torch.autograd.Function):
    """`swiglu` with gradients: the forward kernel, and one backward kernel for dg, du and the routing
    weight's gradient (the twin's autograd: ~12 elementwise kernels and fp32 copies of g and u)."""
    @staticmethod
    def forward(ctx, g, u, weight, limit, out_dtype):
        ctx.save_for_backward(g, u, weight)
        ctx.limit = limit
        return swiglu(g, u, limit, weight, out_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        g, u, weight = ctx.saved_tensors
        dg, du, dw = swiglu_backward(g, u, ctx.limit, weight, dy)
        need = ctx.needs_input_grad
        dw = dw.view(weight.shape).to(weight.dtype) if (need[2] and dw is not None) else None
        return dg if need[0] else None, du if need[1] else None, dw, None, None
