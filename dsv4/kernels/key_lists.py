"""Key lists in one launch (the index arithmetic of `Attention._indices`): of a one-token decode step
(`decode_key_lists`), and of the queries of a training or prefill call (`key_lists`; twin
`dsv4.ops.key_lists_torch`, ~20 small PyTorch ops a layer).

For a row at position p with a ring of W window keys followed by this step's own key (keys
[ring | new], `t_window` = W + 1 of them) and compressed entries after them:

    window part  w = 0..W−1:  key position k = p − (W−1) + w; −1 if k < 0, the new key (W) if k = p,
                              else ring slot k mod W (with the ring given: the new key is first written
                              to its slot p mod W, every k is a ring slot and t_window = W);
    entry part   either the indexer's choice cidx [K] (−1 padded), or, without an indexer, every entry
                 s < min((p+1) // M, n_comp) (HCA); shifted by t_window.

Twin: `dsv4.ops.decode_key_lists_torch`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET
from .launch import cdiv, launchable, next_pow2, pdl, pdl_start


@launchable
@triton.jit
def _key_lists_kernel(POS, CIDX, OUT, KV, RING, ROWS, W, M, n_comp, t_window, KC, stride_c, stride_o,
                      s_kv, s_rb, s_rt, DH,
                      HAS_CIDX: tl.constexpr, IN_RING: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
                      BLOCK_D: tl.constexpr, PDL: tl.constexpr = False):
    pdl_start(PDL)
    b = tl.program_id(0)
    p = tl.load(POS + b).to(tl.int64)
    w = tl.arange(0, BLOCK_W)
    kpos = p - (W - 1) + w
    if IN_RING:     # the new key goes to ring slot p mod W first: the whole window is then in the ring
        r = tl.load(ROWS + b).to(tl.int64)
        for d0 in range(0, DH, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            v = tl.load(KV + b.to(tl.int64) * s_kv + d, mask=d < DH)
            tl.store(RING + r * s_rb + (p % W) * s_rt + d, v.to(RING.dtype.element_ty), mask=d < DH)
        j = kpos % W
    else:
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
                     cidx: torch.Tensor | None, ring: torch.Tensor | None = None, rows: torch.Tensor | None = None,
                     kv: torch.Tensor | None = None) -> torch.Tensor:
    """pos [B] positions; cidx [B, K] or None -> idx [B, 1, W + Kc] int32 (Kc = K, n_comp, or 0 when
    ratio is 0). With ring [Bmax, W, Dh], rows [B] and kv [B, Dh]: first writes kv[b] to ring slot
    pos[b] mod W of row rows[b], and the window part lists ring slots only (keys [ring | entries])."""
    B = pos.shape[0]
    kc = 0 if not ratio else (cidx.shape[-1] if cidx is not None else n_comp)
    out = torch.empty(B, 1, window + kc, dtype=torch.int32, device=pos.device)
    in_ring = ring is not None
    if in_ring:
        if rows is None or kv is None:
            raise ValueError("decode_key_lists: with the ring given, pass the cache rows and the new keys too")
        kv = kv.reshape(B, -1)
        kv = kv if kv.stride(-1) == 1 else kv.contiguous()
        if ring.stride(-1) != 1 or kv.shape[-1] != ring.shape[-1]:
            raise ValueError(f"decode_key_lists: ring {tuple(ring.shape)} must be contiguous in its last dim and "
                             f"as wide as the new keys {tuple(kv.shape)}")
    if B:
        c = cidx.reshape(B, -1).contiguous() if cidx is not None else pos
        dh = ring.shape[-1] if in_ring else 1
        _key_lists_kernel[(B,)](pos.contiguous(), c, out, kv if in_ring else pos, ring if in_ring else pos,
                                rows.contiguous() if in_ring else pos, window, max(ratio, 1), n_comp, t_window, kc,
                                c.stride(0) if cidx is not None else 0, out.stride(0),
                                kv.stride(0) if in_ring else 0, ring.stride(0) if in_ring else 0,
                                ring.stride(1) if in_ring else 0, dh,
                                HAS_CIDX=cidx is not None, IN_RING=in_ring, BLOCK_W=next_pow2(window),
                                BLOCK_C=128 if INTERPRET else 1024, BLOCK_D=min(1024, next_pow2(dh)),
                                num_warps=4, **pdl(pos))
    return out


@launchable
@triton.jit
def _call_lists_kernel(POS, SEG, FIRST, CIDX, OUT, S, s0, Sc, W, M, n_comp, t_window, KC,
                       s_pb, s_sb, s_fb, s_cb, s_cs, s_ob, s_os,
                       CACHED: tl.constexpr, HAS_SEG: tl.constexpr, HAS_FIRST: tl.constexpr,
                       HAS_CIDX: tl.constexpr, RATIO: tl.constexpr, BLOCK_S: tl.constexpr,
                       BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr = False):
    """`key_lists` for BLOCK_S queries of row b (see `dsv4.ops.key_lists_torch` for the rules)."""
    pdl_start(PDL)
    b = tl.program_id(0).to(tl.int64)
    q = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)                   # query within the chunk
    qm = q < Sc
    s = s0 + q                                                                # query within the call
    qp = tl.load(POS + b * s_pb + s, mask=qm, other=0)
    w = tl.arange(0, BLOCK_W)
    wm = qm[:, None] & (w < W)[None, :]
    orow = OUT + b * s_ob + q.to(tl.int64)[:, None] * s_os
    if CACHED:
        p0 = tl.load(POS + b * s_pb)
        kpos = qp[:, None] - (W - 1) + w[None, :]
        j = tl.where(kpos < p0, kpos % W, W + kpos - p0)
        widx = tl.where(kpos >= 0, j, -1)
    else:
        j = s[:, None] - (W - 1) + w[None, :]
        jc = tl.maximum(j, 0)
        d = qp[:, None] - tl.load(POS + b * s_pb + jc, mask=wm, other=0)
        ok = (j >= 0) & (d >= 0) & (d < W)
        if HAS_SEG:
            ok = ok & (tl.load(SEG + b * s_sb + jc, mask=wm, other=0)
                       == tl.load(SEG + b * s_sb + s, mask=qm, other=0)[:, None])
        widx = tl.where(ok, j, -1)
    tl.store(orow + w[None, :], widx.to(tl.int32), mask=wm)
    if RATIO:
        if not HAS_CIDX:
            lo = tl.zeros([BLOCK_S], tl.int64)
            if HAS_FIRST:
                lo = tl.load(FIRST + b * s_fb + s, mask=qm, other=0).to(tl.int64)
            hi = tl.minimum(lo + (qp + 1) // M, n_comp)
        for c0 in range(0, KC, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cm = qm[:, None] & (c < KC)[None, :]
            if HAS_CIDX:
                ci = tl.load(CIDX + b * s_cb + q.to(tl.int64)[:, None] * s_cs + c[None, :], mask=cm,
                             other=-1).to(tl.int64)
                v = tl.where(ci >= 0, ci + t_window, -1)
            else:
                v = tl.where((c[None, :] >= lo[:, None]) & (c[None, :] < hi[:, None]), c[None, :] + t_window, -1)
            tl.store(orow + W + c[None, :], v.to(tl.int32), mask=cm)


def key_lists(pos: torch.Tensor, seg: torch.Tensor | None, first: torch.Tensor | None, s0: int, s1: int,
              window: int, ratio: int, n_comp: int, t_window: int, cidx: torch.Tensor | None,
              cached: bool) -> torch.Tensor:
    """Twin: `dsv4.ops.key_lists_torch` (same arguments) -> idx [B, s1 − s0, W + Kc] int32."""
    B, S = pos.shape
    Sc = s1 - s0
    kc = 0 if not ratio else (cidx.shape[-1] if cidx is not None else n_comp)
    out = torch.empty(B, Sc, window + kc, dtype=torch.int32, device=pos.device)
    if B and Sc:
        pos = pos if pos.stride(-1) == 1 else pos.contiguous()
        sg = seg if seg is None or seg.stride(-1) == 1 else seg.contiguous()
        fs = first if first is None or first.stride(-1) == 1 else first.contiguous()
        ci = cidx if cidx is None or cidx.stride(-1) == 1 else cidx.contiguous()
        block_s = 16
        _call_lists_kernel[(B, cdiv(Sc, block_s))](
            pos, sg if sg is not None else pos, fs if fs is not None else pos, ci if ci is not None else pos, out,
            S, s0, Sc, window, max(ratio, 1), n_comp, t_window, kc,
            pos.stride(0), sg.stride(0) if sg is not None else 0, fs.stride(0) if fs is not None else 0,
            ci.stride(0) if ci is not None else 0, ci.stride(1) if ci is not None else 0, out.stride(0), out.stride(1),
            CACHED=cached, HAS_SEG=sg is not None, HAS_FIRST=fs is not None, HAS_CIDX=ci is not None,
            RATIO=ratio > 0, BLOCK_S=block_s, BLOCK_W=next_pow2(max(window, 1)),
            BLOCK_C=128 if INTERPRET else 256, num_warps=4, **pdl(pos))
    return out
