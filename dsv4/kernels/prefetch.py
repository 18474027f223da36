"""L2 prefetch of weights on a side stream of a CUDA-graph decode step.

A decode step at batch 1 spends much of a layer in short latency-bound kernels (mHC, norms, the
attention over a few hundred keys) during which HBM is idle, then reads a large weight (V4-Flash's
wq_b and wo_a: 32-42 MB in FP8) at well under HBM bandwidth (a GEMV of one token runs a few µs of ramp
and tail around its stream). `l2_prefetch` asks the L2 to fetch a tensor's bytes (`prefetch.global.L2::
evict_last`: fire and forget, nothing comes back to the registers), so that launched on a second stream
ahead of the GEMV (`dsv4.streams.prefetch`) the weight is read from L2 (50 MB on an H100/H200) instead.
sm80+ only (the instruction); elsewhere, and under the interpreter, `l2_prefetch` does nothing.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import cdiv, launchable

INTERPRET = bool(triton.knobs.runtime.interpret)
LINE = 128            # bytes of an L2 line


@launchable
@triton.jit
def _prefetch_kernel(PTR, N_LINES, SINK, LINES: tl.constexpr):
    """Program p: one L2 prefetch per 128-byte line of lines [p·LINES, (p+1)·LINES) of the buffer at PTR."""
    i = tl.minimum(tl.program_id(0) * LINES + tl.arange(0, LINES), N_LINES - 1)   # (the last lines twice)
    ptrs = PTR + i.to(tl.int64) * 128
    r = tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
                                  dtype=tl.int32, is_pure=False, pack=1)
    # (the asm is not pure, so it stays; the masked store of its zeros writes nothing)
    tl.store(SINK + tl.program_id(0), tl.sum(r, 0).to(tl.uint8), mask=tl.program_id(0) < 0)


def capable(t: torch.Tensor) -> bool:
    return (not INTERPRET and t.is_cuda
            and torch.cuda.get_device_capability(t.device.index if t.device.index is not None
                                                 else torch.cuda.current_device()) >= (8, 0))


def l2_prefetch(t: torch.Tensor, lines_per_program: int = 256) -> None:
    """Ask the L2 to fetch the bytes of a contiguous tensor t; a no-op where the GPU or the interpreter
    cannot (and for a tensor that is not contiguous)."""
    if not capable(t) or t.numel() == 0 or not t.is_contiguous():
        return
    b = t.view(-1).view(torch.uint8)
    n = cdiv(b.numel(), LINE)
    _prefetch_kernel[(cdiv(n, lines_per_program),)](b, n, b, LINES=lines_per_program, num_warps=4)
