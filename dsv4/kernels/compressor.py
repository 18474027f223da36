"""Compressor pooling (twin: `dsv4.ops.compress_windows_torch`): for each entry, gather its J slot
tokens' projections and gate scores, softmax over the slots per channel, weighted sum. One program per
(entry, channel block); overlapping entries read features [0, c) for their first M slots and [c, 2c)
for the last M. Memory-bound: reads J·2·BLOCK_C fp32 per entry block, writes BLOCK_C.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from . import INTERPRET
from .fp8_gemm import fp32_to_e4m3
from .launch import cdiv, launchable, next_pow2, pdl, pdl_start


@triton.jit
def _slot_weights(KV, SC, SLOTS, s_b, s_l, s_sb, s_sn, N, C,
                  J: tl.constexpr, M: tl.constexpr, OVERLAP: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (entry, channel block)'s J slots: their places in KV / SC (off, ok), kv values and
    unnormalised softmax weights p over the slots per channel (den their sum; 0 for an empty entry)."""
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
    return b, e, ch, off, ok, kv, p, tl.sum(p, 0)


@launchable
@triton.jit
def _pool_kernel(KV, SC, SLOTS, OUT, s_b, s_l, s_sb, s_sn, s_ob, s_on, N, C,
                 J: tl.constexpr, M: tl.constexpr, OVERLAP: tl.constexpr, BLOCK_C: tl.constexpr,
                 PDL: tl.constexpr = False):
    pdl_start(PDL)
    b, e, ch, off, ok, kv, p, den = _slot_weights(KV, SC, SLOTS, s_b, s_l, s_sb, s_sn, N, C, J, M, OVERLAP, BLOCK_C)
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
    bc = min(block_c, next_pow2(c))
    _pool_kernel[(B * n, cdiv(c, bc))](kv, score, slots, out, kv.stride(0), kv.stride(1),
                                              slots.stride(0), slots.stride(1), out.stride(0), out.stride(1),
                                              n, c, J=J, M=J // 2 if overlap else J, OVERLAP=overlap, BLOCK_C=bc,
                                              **pdl(kv))
    return out


@launchable
@triton.jit
def _pool_bwd_kernel(KV, SC, SLOTS, G, DKV, DSC, s_b, s_l, s_sb, s_sn, s_gb, s_gn, N, C,
                     J: tl.constexpr, M: tl.constexpr, OVERLAP: tl.constexpr, BLOCK_C: tl.constexpr,
                     PDL: tl.constexpr = False):
    """Gradient of `_pool_kernel` for one (entry, channel block): with p the slots' softmax weights and
    out = Σ p·kv, d kv_j = g·p_j and d score_j = g·p_j·(kv_j − out), added at the slot's (token,
    feature) place of DKV / DSC (zeroed by the caller). Full-sequence windows use each place once per
    entry set (the two halves of overlapping windows are different features), so the adds never meet
    and the result is deterministic."""
    pdl_start(PDL)
    b, e, ch, off, ok, kv, p, den = _slot_weights(KV, SC, SLOTS, s_b, s_l, s_sb, s_sn, N, C, J, M, OVERLAP, BLOCK_C)
    p = p / tl.where(den > 0, den, 1.0)[None, :]
    out = tl.sum(p * kv, 0)
    g = tl.load(G + b.to(tl.int64) * s_gb + e.to(tl.int64) * s_gn + ch, mask=ch < C, other=0.0)
    gp = g[None, :] * p
    tl.atomic_add(DKV + off, gp, mask=ok)
    tl.atomic_add(DSC + off, gp * (kv - out[None, :]), mask=ok)


def pool_backward(kv: torch.Tensor, score: torch.Tensor, slots: torch.Tensor, grad: torch.Tensor, overlap: bool,
                  block_c: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (d kv, d score) [B, L, w] fp32 of `pool` for its output gradient grad [B, n, c]."""
    B, L, w = kv.shape
    n, J = slots.shape[1:]
    c = w // 2 if overlap else w
    kv, score = kv.float().contiguous(), score.float().contiguous()
    slots = slots.to(torch.int32).contiguous()
    grad = grad.float().contiguous()
    dkv, dsc = torch.zeros_like(kv), torch.zeros_like(score)
    if B * n:
        bc = min(block_c, next_pow2(c))
        _pool_bwd_kernel[(B * n, cdiv(c, bc))](kv, score, slots, grad, dkv, dsc, kv.stride(0), kv.stride(1),
                                                      slots.stride(0), slots.stride(1), grad.stride(0),
                                                      grad.stride(1), n, c, J=J, M=J // 2 if overlap else J,
                                                      OVERLAP=overlap, BLOCK_C=bc, **pdl(kv))
    return dkv, dsc


@launchable
@triton.jit
def _decode_step_kernel(SKV, SSC, ROWS, KV, SC, APE, POS, OUT, s_sb, s_sl, s_nb, s_ob, s_ape, C,
                        M: tl.constexpr, J: tl.constexpr, OVERLAP: tl.constexpr, BLOCK_C: tl.constexpr,
                        PDL: tl.constexpr = False):
    """One token per row into the compressor state, in place, and the pooled entry of the window it
    completes (zeros where it completes none): the token's score is its gate projection SC plus
    APE[p mod M]; program (row b, block of c channels) writes the token to slot (o·M + p mod M) at its
    channels (both feature halves when windows overlap). Only a token that completes its window (p ≡
    M − 1) reads the other J − 1 slots: it pools (softmax over the slots per channel: previous-window
    slots read features [0, c), own slots [c, 2c)) and, when windows overlap, moves the completed window
    to the previous one; the other M − 1 steps of a window touch one slot."""
    pdl_start(PDL)
    b = tl.program_id(0)
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = ch < C
    r = tl.load(ROWS + b).to(tl.int64)
    p = tl.load(POS + b).to(tl.int64)
    rem = p % M
    slot_new = rem + (M if OVERLAP else 0)
    ape = APE + rem * s_ape
    kv_na = tl.load(KV + b * s_nb + ch, mask=cm, other=0.0)                        # the token, features [0, c)
    sc_na = tl.load(SC + b * s_nb + ch, mask=cm, other=0.0) + tl.load(ape + ch, mask=cm, other=0.0)
    if OVERLAP:                                                                    # and [c, 2c)
        kv_nb = tl.load(KV + b * s_nb + C + ch, mask=cm, other=0.0)
        sc_nb = tl.load(SC + b * s_nb + C + ch, mask=cm, other=0.0) + tl.load(ape + C + ch, mask=cm, other=0.0)
    if rem == M - 1:
        jj = tl.arange(0, J)
        new = (jj == slot_new)[:, None]
        st = SKV + r * s_sb + jj.to(tl.int64)[:, None] * s_sl
        ss = SSC + r * s_sb + jj.to(tl.int64)[:, None] * s_sl
        m2 = (jj >= 0)[:, None] & cm[None, :]
        kv_a = tl.where(new, kv_na[None, :], tl.load(st + ch[None, :], mask=m2, other=0.0))
        sc_a = tl.where(new, sc_na[None, :], tl.load(ss + ch[None, :], mask=m2, other=0.0))
        if OVERLAP:
            kv_b = tl.where(new, kv_nb[None, :], tl.load(st + C + ch[None, :], mask=m2, other=0.0))
            sc_b = tl.where(new, sc_nb[None, :], tl.load(ss + C + ch[None, :], mask=m2, other=0.0))
            own = (jj >= M)[:, None]
            pk = tl.where(own, kv_b, kv_a)
            ps = tl.where(own, sc_b, sc_a)
        else:
            pk = kv_a
            ps = sc_a
        mx = tl.max(ps, 0)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        e = tl.exp(ps - mx[None, :])
        den = tl.sum(e, 0)
        pooled = tl.where(den > 0, tl.sum(e * pk, 0) / tl.where(den > 0, den, 1.0), 0.0)
        tl.store(OUT + b * s_ob + ch, pooled, mask=cm)
        if OVERLAP:
            # slot j < M (previous window) takes slot j + M (own window, the new token in its last slot):
            # the upper half of the slots' rows [2, M, c] stored at slots 0..M-1, both feature halves
            half = tl.arange(0, 2)[:, None, None] == 1
            jm = tl.arange(0, M).to(tl.int64)[:, None] * s_sl
            mm = (tl.arange(0, M) >= 0)[:, None] & cm[None, :]
            lo = SKV + r * s_sb + jm + ch[None, :]
            lo_sc = SSC + r * s_sb + jm + ch[None, :]
            tl.store(lo, tl.sum(tl.where(half, tl.reshape(kv_a, [2, M, BLOCK_C]), 0.0), 0), mask=mm)
            tl.store(lo_sc, tl.sum(tl.where(half, tl.reshape(sc_a, [2, M, BLOCK_C]), 0.0), 0), mask=mm)
            tl.store(lo + C, tl.sum(tl.where(half, tl.reshape(kv_b, [2, M, BLOCK_C]), 0.0), 0), mask=mm)
            tl.store(lo_sc + C, tl.sum(tl.where(half, tl.reshape(sc_b, [2, M, BLOCK_C]), 0.0), 0), mask=mm)
        else:
            tl.store(st + ch[None, :], kv_a, mask=m2)
            tl.store(ss + ch[None, :], sc_a, mask=m2)
    else:
        tl.store(OUT + b * s_ob + ch, tl.zeros([BLOCK_C], tl.float32), mask=cm)
    if OVERLAP or rem != M - 1:        # the token's own slot (a non-overlapping window stored it above)
        one = SKV + r * s_sb + slot_new * s_sl
        one_sc = SSC + r * s_sb + slot_new * s_sl
        tl.store(one + ch, kv_na, mask=cm)
        tl.store(one_sc + ch, sc_na, mask=cm)
        if OVERLAP:
            tl.store(one + C + ch, kv_nb, mask=cm)
            tl.store(one_sc + C + ch, sc_nb, mask=cm)


def decode_step(state_kv: torch.Tensor, state_sc: torch.Tensor, rows: torch.Tensor, kv: torch.Tensor,
                gate: torch.Tensor, ape: torch.Tensor, pos: torch.Tensor, ratio: int, overlap: bool,
                block_c: int = 64) -> torch.Tensor:
    """state_kv, state_sc [Bmax, J, w] fp32 (updated in place); rows [B] (distinct); kv, gate [B, 1, w]
    fp32; ape [M, w]; pos [B] -> pooled [B, 1, c] fp32 (zeros in rows whose token completes no window).
    Twin: `dsv4.ops.compressor_step_torch`."""
    B = rows.shape[0]
    J, w = state_kv.shape[1:]
    c = w // 2 if overlap else w
    if state_kv.stride(-1) != 1 or state_sc.stride() != state_kv.stride() or J & (J - 1):
        raise ValueError("compressor decode kernel: contiguous-channel states of one layout and a power-of-two "
                         f"slot count needed; got strides {state_kv.stride()} / {state_sc.stride()}, J={J}")
    kv, score = kv.float().reshape(B, w).contiguous(), gate.float().reshape(B, w).contiguous()
    ape = ape.float().contiguous()
    out = torch.empty(B, 1, c, device=kv.device, dtype=torch.float32)
    if B:
        bc = min(block_c, next_pow2(c))
        _decode_step_kernel[(B, cdiv(c, bc))](state_kv, state_sc, rows.contiguous(), kv, score, ape,
                                                      pos.contiguous(), out, state_kv.stride(0), state_kv.stride(1),
                                                      kv.stride(0), out.stride(0), ape.stride(0), c, M=ratio, J=J,
                                                      OVERLAP=overlap, BLOCK_C=bc, **pdl(state_kv))
    return out


@launchable
@triton.jit
def _entry_kernel(POOLED, W, POS, ROWS, FREQ, ENT, s_pb, s_eb, s_en, n_max, eps,
                  M: tl.constexpr, C: tl.constexpr, DR2: tl.constexpr, KV8: tl.constexpr = False,
                  VAL_DTYPE: tl.constexpr = tl.float32, OFF_SC: tl.constexpr = 0, OFF_ROPE: tl.constexpr = 0,
                  PRECISE: tl.constexpr = False, PDL: tl.constexpr = False):
    """Program b: when position POS[b] completes a window (≡ M − 1 mod M), its pooled entry (fp32) rounded
    to the entries' dtype, RMS-normalised with W, rounded again and roped at position (POS[b] // M)·M
    goes to ENT[ROWS[b], min(POS[b] // M, n_max − 1)]; otherwise nothing is written. The rounding steps
    are those of `Compressor.finish` (a cast, then `norm_rope`). With KV8 the entry (values in VAL_DTYPE)
    is written as an FP8 row (`dsv4.ops.kv8_quant`): e4m3 codes of the nope dims with one power-of-two
    scale per 64 (⌈log2(amax/448)⌉ from the bits, amax/448 rounded to nearest as PyTorch divides), e8m0
    scale bytes at OFF_SC, the rope dims at OFF_ROPE."""
    pdl_start(PDL)
    b = tl.program_id(0)
    p = tl.load(POS + b).to(tl.int64)
    if p % M == M - 1:
        i = p // M
        at = tl.minimum(i, n_max - 1)
        dst = ENT + tl.load(ROWS + b).to(tl.int64) * s_eb + at * s_en
        src = POOLED + b.to(tl.int64) * s_pb
        if KV8:
            dt = VAL_DTYPE
        else:
            dt = ENT.dtype.element_ty
        d = tl.arange(0, C)
        x = tl.load(src + d).to(dt).to(tl.float32)
        rs = 1.0 / tl.sqrt(tl.sum(x * x, 0) / C + eps)
        NOPE: tl.constexpr = C - 2 * DR2
        y = (x * rs * tl.load(W + d).to(tl.float32)).to(dt)
        k = tl.arange(0, DR2)
        ang = (i * M).to(tl.float32) * tl.load(FREQ + k).to(tl.float32)
        c = tl.cos(ang)
        s = tl.sin(ang)
        e_at = NOPE + 2 * k
        xe = tl.load(src + e_at).to(dt).to(tl.float32) * rs * tl.load(W + e_at).to(tl.float32)
        xo = tl.load(src + e_at + 1).to(dt).to(tl.float32) * rs * tl.load(W + e_at + 1).to(tl.float32)
        xe = xe.to(dt).to(tl.float32)
        xo = xo.to(dt).to(tl.float32)
        if KV8:
            yb = tl.reshape(tl.where(d < NOPE, y.to(tl.float32), 0.0), [C // 64, 64])
            amax = tl.maximum(tl.max(tl.abs(yb), 1), 1e-4)                        # [C / 64]
            if PRECISE:
                v = libdevice.div_rn(amax, 448.0)
            else:
                v = amax / 448.0
            bits = v.to(tl.int32, bitcast=True)
            e = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(tl.int32)
            inv = ((127 - e) << 23).to(tl.float32, bitcast=True)                   # 2^−e
            q = tl.minimum(tl.maximum(yb * inv[:, None], -448.0), 448.0)
            code = fp32_to_e4m3(tl.reshape(q, [C])).to(tl.uint8)
            tl.store(dst + d, code, mask=d < NOPE)
            blk = tl.arange(0, C // 64)
            tl.store(dst + OFF_SC + blk, (e + 127).to(tl.uint8), mask=blk < NOPE // 64)
            rope = (dst + OFF_ROPE).to(tl.pointer_type(dt))
            tl.store(rope + 2 * k, (xe * c - xo * s).to(dt))
            tl.store(rope + 2 * k + 1, (xe * s + xo * c).to(dt))
        else:
            tl.store(dst + d, y, mask=d < NOPE)
            tl.store(dst + e_at, (xe * c - xo * s).to(dt))
            tl.store(dst + e_at + 1, (xe * s + xo * c).to(dt))


def write_entry(entries: torch.Tensor, rows: torch.Tensor, pooled: torch.Tensor, pos: torch.Tensor, ratio: int,
                weight: torch.Tensor, eps: float, freqs: torch.Tensor, kv8_dtype: torch.dtype | None = None) -> None:
    """entries [Bmax, Cmax, c] (written in place); rows, pos [B]; pooled [B, 1, c] fp32 (the compressor
    step's); weight [c]; freqs [Dr/2]. Twin: `dsv4.ops.compressor_entry_torch`. With kv8_dtype, entries
    are FP8 rows [Bmax, Cmax, bytes] uint8 whose values are in that dtype (twin:
    `dsv4.ops.compressor_entry_torch(..., kv8_dtype)`)."""
    B, c = pooled.shape[0], pooled.shape[-1]
    dr2 = freqs.shape[-1]
    fp8 = {}
    if kv8_dtype is not None:
        from dsv4.ops import kv8_layout
        off_sc, off_rope, _ = kv8_layout(c, 2 * dr2, kv8_dtype)
        fp8 = dict(KV8=True, VAL_DTYPE={torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
                                        torch.float32: tl.float32}[kv8_dtype],
                   OFF_SC=off_sc, OFF_ROPE=off_rope, PRECISE=not INTERPRET)
    if c & (c - 1) or dr2 & (dr2 - 1) or entries.stride(-1) != 1 or 2 * dr2 > c or (fp8 and c < 64):
        raise ValueError(f"compressor entry kernel: power-of-two entry width ({c}) and rope pairs ({dr2}) "
                         "and contiguous entry rows needed")
    if B == 0 or entries.shape[1] == 0:
        return
    pooled = pooled.reshape(B, c)
    if pooled.stride(-1) != 1:
        pooled = pooled.contiguous()
    _entry_kernel[(B,)](pooled, weight.contiguous(), pos.contiguous(), rows.contiguous(), freqs.contiguous(),
                        entries, pooled.stride(0), entries.stride(0), entries.stride(1), entries.shape[1],
                        float(eps), M=ratio, C=c, DR2=dr2, num_warps=4 if c >= 256 else 1, **fp8, **pdl(pooled))
