"""mHC mixing coefficients (twin: `dsv4.ops.hc_split_sinkhorn_torch`): sigmoid pre/post gates and the
Sinkhorn projection of the n×n stream-mixing matrix, all iterations in registers in one launch (the
PyTorch form launches ~4 small kernels per iteration). One program handles BLOCK tokens; the n×n
matrices are held as [BLOCK, n, n] (n a power of two).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sinkhorn_kernel(MIX, SCALE, BASE, PRE, POST, COMB, N_TOK, eps, ITERS: tl.constexpr,
                     NS: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tm = t < N_TOK
    i = tl.arange(0, NS)
    width = (2 + NS) * NS
    row = MIX + t.to(tl.int64)[:, None] * width
    s0 = tl.load(SCALE)
    s1 = tl.load(SCALE + 1)
    s2 = tl.load(SCALE + 2)
    pre = tl.load(row + i[None, :], mask=tm[:, None], other=0.0) * s0 + tl.load(BASE + i)[None, :]
    post = tl.load(row + NS + i[None, :], mask=tm[:, None], other=0.0) * s1 + tl.load(BASE + NS + i)[None, :]
    tl.store(PRE + t[:, None] * NS + i[None, :], tl.sigmoid(pre) + eps, mask=tm[:, None])
    tl.store(POST + t[:, None] * NS + i[None, :], 2 * tl.sigmoid(post), mask=tm[:, None])
    jk = i[:, None] * NS + i[None, :]                                                  # [NS, NS]
    c = tl.load(row[:, :, None] + 2 * NS + jk[None, :, :], mask=tm[:, None, None], other=0.0) * s2 \
        + tl.load(BASE + 2 * NS + jk)[None, :, :]                                      # [BLOCK, NS, NS]
    c = tl.exp(c - tl.max(c, 2)[:, :, None])
    c = c / tl.sum(c, 2)[:, :, None] + eps
    c = c / (tl.sum(c, 1)[:, None, :] + eps)
    for _ in tl.static_range(ITERS - 1):
        c = c / (tl.sum(c, 2)[:, :, None] + eps)
        c = c / (tl.sum(c, 1)[:, None, :] + eps)
    tl.store(COMB + t.to(tl.int64)[:, None, None] * (NS * NS) + jk[None, :, :], c, mask=tm[:, None, None])


def split_sinkhorn(mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, n: int, iters: int,
                   eps: float, block: int = 64):
    """pre [.., n], post [.., n], comb [.., n, n] fp32 from mixes [.., (2+n)·n]."""
    if n & (n - 1):
        raise ValueError(f"mHC kernel: hc_mult {n} must be a power of two")
    lead = mixes.shape[:-1]
    mix = mixes.float().reshape(-1, (2 + n) * n).contiguous()
    T = mix.shape[0]
    pre = torch.empty(T, n, device=mix.device, dtype=torch.float32)
    post = torch.empty_like(pre)
    comb = torch.empty(T, n, n, device=mix.device, dtype=torch.float32)
    if T:
        _sinkhorn_kernel[(triton.cdiv(T, block),)](mix, scale.float().contiguous(), base.float().contiguous(),
                                                   pre, post, comb, T, eps, ITERS=iters, NS=n, BLOCK=block)
    return pre.view(*lead, n), post.view(*lead, n), comb.view(*lead, n, n)
