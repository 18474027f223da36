"""y = x · Wᵀ for one or two rows of x (the decode step's projections), one launch, no split-K.

cuBLAS runs a decode step's M = 1 GEMMs as tiled GEMMs (8 × 64 tiles, 5-8 µs each on an H200 for
matrices of 1-10 MB, far from their memory time). Here each program owns BN output rows and walks K in
chunks of BK columns, accumulating w · x in fp32 per column lane; the lanes are summed once after the
loop. Weights are read once, in contiguous runs along K (16-byte loads), for up to ROWS_MAX rows of x.
Twin: `dsv4.ops.linear_rows_torch` (F.linear, or a GEMM with an fp32 output).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import INTERPRET
from .launch import cdiv, launchable, next_pow2, pdl, pdl_start

ROWS_MAX = 2           # rows of x one launch carries (an accumulator each)


@launchable
@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, stride_xm, stride_wn, stride_ym, RG, stride_xg,
                 ROWS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr = False):
    """Program pid: output rows [pid·BN, (pid+1)·BN), all in group pid·BN // RG, whose x starts at
    x_ptr + group · stride_xg (one group: RG = N, stride_xg = 0)."""
    pdl_start(PDL)
    pid = tl.program_id(0)
    x_ptr += ((pid * BN) // RG).to(tl.int64) * stride_xg
    rn = pid * BN + tl.arange(0, BN)
    n_ok = rn < N
    rk = tl.arange(0, BK)
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
    acc0 = tl.zeros((BN, BK), tl.float32)
    acc1 = tl.zeros((BN, BK), tl.float32)
    for k0 in range(0, K, BK):
        k_ok = (k0 + rk) < K
        w = tl.load(w_ptrs + k0, mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        x0 = tl.load(x_ptr + k0 + rk, mask=k_ok, other=0.0).to(tl.float32)
        acc0 += w * x0[None, :]
        if ROWS > 1:
            x1 = tl.load(x_ptr + stride_xm + k0 + rk, mask=k_ok, other=0.0).to(tl.float32)
            acc1 += w * x1[None, :]
    out_ty = y_ptr.dtype.element_ty
    tl.store(y_ptr + rn, tl.sum(acc0, 1).to(out_ty), mask=n_ok)
    if ROWS > 1:
        tl.store(y_ptr + stride_ym + rn, tl.sum(acc1, 1).to(out_ty), mask=n_ok)


@functools.lru_cache(maxsize=None)
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def tiles(N: int, K: int, device: torch.device) -> dict:
    """BN output rows per program: the largest power of two <= 16 leaving >= 4 programs per SM (at
    least one row); BK filling a tile of 4,096 weights (32 per thread at 4 warps), at least 64 and at
    most K rounded up to a power of two."""
    if INTERPRET or device.type != "cuda":
        return dict(BN=32, BK=256, num_warps=4)     # few, large programs: the interpreter pays per program
    sms = _sms(device.index if device.index is not None else torch.cuda.current_device())
    bn = 1
    while 2 * bn <= 16 and N // (2 * bn) >= 4 * sms:
        bn *= 2
    bk = min(max(64, 4096 // bn), max(64, next_pow2(K)))
    return dict(BN=bn, BK=bk, num_warps=4)


def gemv(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype | None = None, groups: int = 1,
         **launch) -> torch.Tensor:
    """x [..., K] with at most ROWS_MAX rows in all; weight [N, K] (unit column stride) -> [..., N] in
    out_dtype (default x's), fp32 accumulation. `launch` (BN, BK, num_warps) overrides `tiles`.

    groups G > 1, a grouped projection: x [..., G, K], weight [G·R, K] whose rows [g·R, (g+1)·R) read
    x[..., g, :] -> [..., G·R] (the block-diagonal product `attention.grouped_linear` computes)."""
    K = x.shape[-1]
    N = weight.shape[0]
    if weight.dim() != 2 or weight.shape[1] != K or weight.stride(1) != 1:
        raise ValueError(f"GEMV: weight must be [N, {K}] with unit column stride; got {tuple(weight.shape)} "
                         f"strides {weight.stride()}")
    if groups > 1 and (x.dim() < 2 or x.shape[-2] != groups or N % groups):
        raise ValueError(f"GEMV: {groups} groups need x [..., {groups}, K] and weight rows a multiple of "
                         f"{groups}; got x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    lead = x.shape[:-2] if groups > 1 else x.shape[:-1]
    x2 = x.reshape(-1, groups * K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if M > ROWS_MAX:
        raise ValueError(f"GEMV: at most {ROWS_MAX} rows, got {M}")
    y = torch.empty(M, N, dtype=out_dtype or x.dtype, device=x.device)
    if M and N:
        cfg = {**tiles(N, K, x.device), **launch}
        BN, BK = int(cfg["BN"]), int(cfg["BK"])
        R = N // groups
        while groups > 1 and R % BN:      # a program's rows within one group
            BN //= 2
        _gemv_kernel[(cdiv(N, BN),)](x2, weight, y, N, K, x2.stride(0), weight.stride(0), y.stride(0),
                                            R, K if groups > 1 else 0, ROWS=M, BN=BN, BK=BK,
                                            num_warps=int(cfg["num_warps"]), **pdl(x2))
    return y.view(*lead, N)
