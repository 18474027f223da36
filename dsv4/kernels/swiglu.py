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


@triton.jit
def _swiglu_kernel(G, U, W, OUT, n, I, limit, HAS_W: tl.constexpr, HAS_LIMIT: tl.constexpr, BLOCK: tl.constexpr):
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
        _swiglu_kernel[(triton.cdiv(n, block),)](g, u, w, out, n, I, float(limit), HAS_W=weight is not None,
                                                 HAS_LIMIT=limit > 0, BLOCK=block,
                                                 num_warps=1 if INTERPRET else 4)
    return out
