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

Small M (decode) splits K over several programs (fp32 partial sums in a workspace, summed after:
deterministic) so that a matrix of a few thousand rows still spreads over every SM.

Under `TRITON_INTERPRET=1` (CPU tests) the dot runs in fp32 (the interpreter's bf16 dot is wrong)
with one small tile configuration. The kernels use only core `tl` builtins, none of the `@jit` helpers
of `triton.language.standard` (`tl.cdiv`, `tl.zeros`, `tl.sigmoid`): those are compiled-mode functions
when triton was imported before TRITON_INTERPRET was set (torch imports it), and fail in the interpreter.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

INTERPRET = bool(triton.knobs.runtime.interpret)


# ----------------------------------------------------------------------------- format decoding (shared with fp4_moe)
@triton.jit
def e8m0_to_fp32(s):
    """e8m0 codes (int32, 0..254) -> 2^(s - 127) in fp32; code 0 is the subnormal 2^-127."""
    bits = tl.where(s == 0, 0x00400000, s << 23)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def e4m3_to_fp32(b):
    """e4m3fn codes (int32, 0..255) -> fp32, exact, with integer operations only (any GPU)."""
    mag = b & 0x7F
    normal = ((mag << 20) + (120 << 23)).to(tl.float32, bitcast=True)   # exponent bias 7 -> 127
    sub = (mag & 7).to(tl.float32) * 0.001953125                         # subnormals: m · 2^-9
    v = tl.where((mag >> 3) == 0, sub, normal)
    return tl.where((b & 0x80) != 0, -v, v)


@triton.jit
def _fp8_gemm_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, k_per_split,
                     stride_xm, stride_wn, stride_sn, stride_ym, stride_ys,
                     SBN: tl.constexpr, SBK: tl.constexpr, SCALE_E8M0: tl.constexpr, NATIVE_FP8: tl.constexpr,
                     DOT_FP32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     GROUP_M: tl.constexpr):
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
    tiles = triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"])
    k_steps = triton.cdiv(K, cfg["BK"])
    split = 1
    if M <= 64 and tiles < 2 * sms:   # memory-bound: give every SM a couple of programs
        split = max(1, min(k_steps // 4, triton.cdiv(2 * sms, tiles)))
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
    want = (triton.cdiv(N, block[0]), triton.cdiv(K, block[1]))
    if tuple(scale.shape) != want or scale.dtype not in (torch.float8_e8m0fnu, torch.float32):
        raise ValueError(f"scale must be e8m0 or fp32 of shape {want} for a weight {(N, K)} with {block} blocks; "
                         f"got {scale.dtype} {tuple(scale.shape)}")
    if block[1] < 16 or block[1] & (block[1] - 1) or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"the Triton FP8 GEMM needs bf16/fp16/fp32 activations and a K block that is a power of "
                         f"two >= 16; got {x.dtype}, block {block}")


def _fp8_gemm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block_n: int, block_k: int) -> torch.Tensor:
    K = x.shape[-1]
    N = weight.shape[0]
    x2 = x.reshape(-1, K)                                                         # [M, K]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y.view(*x.shape[:-1], N)
    cfg, split = _tiles(M, N, K, block_k, x.device)
    bk = cfg["BK"]
    k_per_split = triton.cdiv(triton.cdiv(K, split), bk) * bk       # a multiple of BK (so of no scale block edge)
    split = triton.cdiv(K, k_per_split)
    out = y if split == 1 else torch.empty(split, M, N, dtype=torch.float32, device=x.device)
    w = weight.contiguous().view(torch.uint8)
    e8m0 = scale.dtype == torch.float8_e8m0fnu
    s = scale.contiguous().view(torch.uint8) if e8m0 else scale.contiguous()
    native = _native_fp8(x.device)
    grid = (triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"]), split)
    _fp8_gemm_kernel[grid](
        x2, w, s, out, M, N, K, k_per_split, x2.stride(0), w.stride(0), s.stride(0),
        out.stride(-2), out.stride(0) if split > 1 else 0,
        SBN=block_n, SBK=block_k, SCALE_E8M0=e8m0, NATIVE_FP8=native,
        DOT_FP32=INTERPRET or x.dtype == torch.float32, **cfg)
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
