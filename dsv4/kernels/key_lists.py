"""Key lists of a one-token decode step in one launch (the index arithmetic of `Attention._indices`).

For a row at position p with a ring of W window keys followed by this step's own key (keys
[ring | new], `t_window` = W + 1 of them) and compressed entries after them:

    window part  w = 0..W−1:  key position k = p − (W−1) + w; −1 if k < 0, the new key (W) if k = p,
                              else ring slot k mod W;
    entry part   either the indexer's choice cidx [K] (−1 padded), or, without an indexer, every entry
                 s < min((p+1) // M, n_comp) (HCA); shifted by t_window.

Twin: `dsv4.ops.decode_key_lists_torch`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET


@triton.jit
def _key_lists_kernel(POS, CIDX, OUT, W, M, n_comp, t_window, KC, stride_c, stride_o,
                      HAS_CIDX: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    p = tl.load(POS + b).to(tl.int64)
    w = tl.arange(0, BLOCK_W)
    kpos = p - (W - 1) + w
    j = tl.where(kpos < p, kpos % W, W)
    tl.store(OUT + b * stride_o + w, tl.where(kpos >= 0, j, -1).to(tl.int32), mask=w < W)
    hi = tl.minimum((p + 1) // M, n_comp)
    for c0 in range(0, KC, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < KC
        if HAS_CIDX:
            ci = tl.load(CIDX + b * stride_c + c, mask=cm, other=-1).to(tl.int64)
            v = tl.where(ci >= 0, ci + t_window, -1)
        else:
            v = tl.where(c < hi, c + t_window, -1)
        tl.store(OUT + b * stride_o + W + c, v.to(tl.int32), mask=cm)


def decode_key_lists(pos: torch.Tensor, window: int, ratio: int, n_comp: int, t_window: int,
                     cidx: torch.Tensor | None) -> torch.Tensor:
    """pos [B] positions; cidx [B, K] or None -> idx [B, 1, W + Kc] int32 (Kc = K, n_comp, or 0 when
    ratio is 0)."""
    B = pos.shape[0]
    kc = 0 if not ratio else (cidx.shape[-1] if cidx is not None else n_comp)
    out = torch.empty(B, 1, window + kc, dtype=torch.int32, device=pos.device)
    if B:
        c = cidx.reshape(B, -1).contiguous() if cidx is not None else pos
        _key_lists_kernel[(B,)](pos.contiguous(), c, out, window, max(ratio, 1), n_comp, t_window, kc,
                                c.stride(0) if cidx is not None else 0, out.stride(0),
                                HAS_CIDX=cidx is not None, BLOCK_W=triton.next_power_of_2(window),
                                BLOCK_C=128 if INTERPRET else 1024, num_warps=4)
    return out
