"""Compressor pooling (twin: `dsv4.ops.compress_windows_torch`): for each entry, gather its J slot
tokens' projections and gate scores, softmax over the slots per channel, weighted sum. One program per
(entry, channel block); overlapping entries read features [0, c) for their first M slots and [c, 2c)
for the last M. Memory-bound: reads J·2·BLOCK_C fp32 per entry block, writes BLOCK_C.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _pool_kernel(KV, SC, SLOTS, OUT, s_b, s_l, s_sb, s_sn, s_ob, s_on, N, C,
                 J: tl.constexpr, M: tl.constexpr, OVERLAP: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // N
    e = pid % N
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    jj = tl.arange(0, J)
    slot = tl.load(SLOTS + b.to(tl.int64) * s_sb + e.to(tl.int64) * s_sn + jj)
    if OVERLAP:
        feat = tl.where(jj < M, 0, C)[:, None] + ch[None, :]
    else:
        feat = ch[None, :] + jj[:, None] * 0
    ok = (slot >= 0)[:, None] & (ch < C)[None, :]
    off = b.to(tl.int64) * s_b + tl.maximum(slot, 0).to(tl.int64)[:, None] * s_l + feat
    kv = tl.load(KV + off, mask=ok, other=0.0)
    sc = tl.load(SC + off, mask=ok, other=float("-inf"))
    mx = tl.max(sc, 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    p = tl.exp(sc - mx[None, :])
    den = tl.sum(p, 0)
    num = tl.sum(p * kv, 0)
    out = tl.where(den > 0, num / tl.where(den > 0, den, 1.0), 0.0)
    tl.store(OUT + b.to(tl.int64) * s_ob + e.to(tl.int64) * s_on + ch, out, mask=ch < C)


def pool(kv: torch.Tensor, score: torch.Tensor, slots: torch.Tensor, overlap: bool, block_c: int = 128):
    """[B, n, c] fp32 from kv, score [B, L, w] fp32 and slots [B, n, J] (−1 = empty)."""
    B, L, w = kv.shape
    n, J = slots.shape[1:]
    if J & (J - 1):
        raise ValueError(f"compressor kernel: {J} slots per entry must be a power of two")
    c = w // 2 if overlap else w
    kv, score = kv.float().contiguous(), score.float().contiguous()
    slots = slots.to(torch.int32).contiguous()
    out = torch.empty(B, n, c, device=kv.device, dtype=torch.float32)
    if B * n == 0:
        return out
    bc = min(block_c, triton.next_power_of_2(c))
    _pool_kernel[(B * n, triton.cdiv(c, bc))](kv, score, slots, out, kv.stride(0), kv.stride(1),
                                              slots.stride(0), slots.stride(1), out.stride(0), out.stride(1),
                                              n, c, J=J, M=J // 2 if overlap else J, OVERLAP=overlap, BLOCK_C=bc)
    return out
