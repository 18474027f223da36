"""mHC mixing coefficients (twin: `dsv4.ops.hc_split_sinkhorn_torch`): sigmoid pre/post gates and the
Sinkhorn projection of the n×n stream-mixing matrix, all iterations in registers in one launch (the
PyTorch form launches ~4 small kernels per iteration). One program handles BLOCK tokens; the n×n
matrices are held as [BLOCK, n, n] (n a power of two). hc_pre and hc_post have backward kernels too
(`hc_pre_backward`, `hc_post_backward`, used by the autograd Functions in `dsv4.ops`).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import INTERPRET
from .launch import cdiv, launchable, next_pow2, pdl, pdl_start


class PendingMix(NamedTuple):
    """hc_pre's post and comb, not yet computed (`hc_pre(..., defer=True)`): the scaled mix logits
    [T, (2+N)·N] fp32 and what turns them into post and comb. `resolve()` computes both in PyTorch
    (`ops.hc_split_sinkhorn_torch`); the `hc_post` kernel computes them itself."""
    mixes: torch.Tensor
    scale: torch.Tensor
    base: torch.Tensor
    n: int
    iters: int
    eps: float
    lead: tuple

    def resolve(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(post [*lead, N], comb [*lead, N, N]) fp32."""
        from dsv4.ops import hc_split_sinkhorn_torch
        _, post, comb = hc_split_sinkhorn_torch(self.mixes, self.scale.float(), self.base.float(), self.n,
                                                self.iters, self.eps)
        return post.view(*self.lead, self.n), comb.view(*self.lead, self.n, self.n)


@triton.jit
def _sinkhorn(c, eps, ITERS: tl.constexpr):
    """comb logits [BLOCK, N, N] -> doubly stochastic: row softmax (+ eps), column normalisation, then
    ITERS − 1 more row/column normalisation pairs (spec §9; sums over axis 2 = rows, axis 1 = columns)."""
    c = tl.exp(c - tl.max(c, 2)[:, :, None])
    c = c / tl.sum(c, 2)[:, :, None] + eps
    c = c / (tl.sum(c, 1)[:, None, :] + eps)
    for _ in tl.static_range(ITERS - 1):
        c = c / (tl.sum(c, 2)[:, :, None] + eps)
        c = c / (tl.sum(c, 1)[:, None, :] + eps)
    return c


@launchable
@triton.jit
def _sinkhorn_kernel(MIX, SCALE, BASE, PRE, POST, COMB, N_TOK, eps, ITERS: tl.constexpr,
                     NS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_start(PDL)
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
    c = _sinkhorn(c, eps, ITERS)
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
        _sinkhorn_kernel[(cdiv(T, block),)](mix, scale.float().contiguous(), base.float().contiguous(),
                                                   pre, post, comb, T, eps, ITERS=iters, NS=n, BLOCK=block, **pdl(mix))
    return pre.view(*lead, n), post.view(*lead, n), comb.view(*lead, n, n)


@triton.jit
def _split_bf16(x):
    """fp32 x as three bf16 parts, x1 + x2 + x3 = x to ~2⁻²⁴ of its size (each part the rounding of what
    the previous ones leave; every difference is exact in fp32)."""
    x1 = x.to(tl.bfloat16)
    rest = x - x1.to(tl.float32)
    x2 = rest.to(tl.bfloat16)
    return x1, x2, (rest - x2.to(tl.float32)).to(tl.bfloat16)


@launchable
@triton.jit
def _hc_mix_kernel(H, FN, SS, MIX, N_TOK, D, K_PER,
                   NS: tl.constexpr, NP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                   PREC: tl.constexpr, SPLIT3: tl.constexpr = False, F32_DOT: tl.constexpr = False,
                   HEAD: tl.constexpr = False, PDL: tl.constexpr = False):
    """hc_pre, part 1, for BLOCK_T tokens and one slice [K_PER·split, K_PER·(split+1)) of the N·D stream
    values: Σ h² and the (2+N)·N mix logits h · fnᵀ as one fp32 dot against fn read as NP rows (zeros
    past its (2+N)·N; below 16 tokens, products summed over the block instead of a dot),
    stored as partial sums per slice (a slice per program keeps the GPU busy when there are few
    tokens, as in a decode step).

    SPLIT3 (bf16 streams): fn = f1 + f2 + f3, three bf16 parts split here (f1 = bf16(fn), f2 = bf16(fn −
    f1), f3 = bf16(fn − f1 − f2): fn to ~2⁻²⁴ of its size, as fp32 holds it), and the logits are three bf16
    tensor-core dots with fp32 accumulation; h is a bf16 value, so every product is exact and the result
    is the fp32 dot up to the order of the sums. F32_DOT runs the same dots on fp32 copies of the parts
    (the interpreter). HEAD: fn has N rows (`hc_head`'s), not (2+N)·N."""
    pdl_start(PDL)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    sp = tl.program_id(1)
    tm = t < N_TOK
    ND = NS * D
    k = tl.arange(0, BLOCK_K)
    r = tl.arange(0, NP)
    hrow = H + t.to(tl.int64)[:, None] * ND
    ss = tl.zeros([BLOCK_T], tl.float32)
    acc = tl.zeros([BLOCK_T, NP], tl.float32)
    k_hi = tl.minimum(ND, (sp + 1) * K_PER)
    for k0 in range(sp * K_PER, k_hi, BLOCK_K):
        kk = k0 + k
        km = kk < k_hi
        hraw = tl.load(hrow + kk[None, :], mask=tm[:, None] & km[None, :], other=0.0)                  # [BT, BK]
        hv = hraw.to(tl.float32)
        ss += tl.sum(hv * hv, 1)
        f = tl.load(FN + r[None, :].to(tl.int64) * ND + kk[:, None],
                    mask=km[:, None] & (r < (NS if HEAD else (2 + NS) * NS))[None, :], other=0.0)       # [BK, NP]
        if SPLIT3:
            f1, f2, f3 = _split_bf16(f)
            if F32_DOT:
                acc += tl.dot(hv, f3.to(tl.float32), input_precision="ieee")
                acc += tl.dot(hv, f2.to(tl.float32), input_precision="ieee")
                acc += tl.dot(hv, f1.to(tl.float32), input_precision="ieee")
            else:
                hb = hraw.to(tl.bfloat16)
                acc = tl.dot(hb, f3, acc)
                acc = tl.dot(hb, f2, acc)
                acc = tl.dot(hb, f1, acc)
        elif BLOCK_T >= 16:
            acc += tl.dot(hv, f, input_precision=PREC)
        else:                          # a decode step's few tokens: products and a sum over the block
            acc += tl.sum(hv[:, :, None] * f[None, :, :], 1)
    base = (sp * N_TOK + t).to(tl.int64)
    tl.store(SS + base, ss, mask=tm)
    tl.store(MIX + base[:, None] * NP + r[None, :], acc, mask=tm[:, None])


@launchable
@triton.jit
def _hc_finish_kernel(H, SS, MIX, SCALE, BASE, X, POST, COMB, N_TOK, D, NSPLIT, D_PER, SEP, eps, norm_eps,
                      MIXES, RHO, PRE, ITERS: tl.constexpr, NS: tl.constexpr, NP: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_BLOCK: tl.constexpr,
                      HEAD: tl.constexpr = False, DEFER: tl.constexpr = False, PDL: tl.constexpr = False):
    """hc_pre, part 2: the slices' sums, RMS scaling, gates, Sinkhorn, then x = Σ_j pre_j h_j over the
    columns [c·D_PER, (c+1)·D_PER), c = pd − SEP, of program (·, pd). Every program of a token block
    computes the gates; program pd = 0 also runs the Sinkhorn and stores post, comb and, with MIXES (and
    RHO, PRE) given, what the backward pass needs: the scaled mix logits [T, (2+N)·N], rho [T] and pre
    [T, N] (None: not compiled in). SEP = 1: program 0 does only that, beside the column ranges.
    HEAD (`hc_head`): the mix holds the N head logits only; x = Σ_j pre_j h_j with pre = sigmoid(logit ·
    rho · scale[0] + base) + eps, nothing else computed or stored (POST, COMB unused).
    DEFER: program 0 stores the scaled mix logits (MIXES) and neither post nor comb (`hc_post` computes
    them from MIXES); RHO and PRE may be None."""
    pdl_start(PDL)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    first = tl.program_id(1) == 0
    tm = t < N_TOK
    ND = NS * D
    r2 = tl.arange(0, 2 * NS)
    rc = tl.arange(0, NS * NS)
    ss = tl.zeros([BLOCK_T], tl.float32)
    pp = tl.zeros([BLOCK_T, 2 * NS], tl.float32)
    cc = tl.zeros([BLOCK_T, NS * NS], tl.float32)
    sb = tl.arange(0, SPLIT_BLOCK)
    for sp0 in range(0, NSPLIT, SPLIT_BLOCK):        # SPLIT_BLOCK slices' partial sums per load
        spv = sp0 + sb
        m2 = (spv < NSPLIT)[:, None] & tm[None, :]
        base = (spv[:, None] * N_TOK + t[None, :]).to(tl.int64)                                # [SB, BT]
        ss += tl.sum(tl.load(SS + base, mask=m2, other=0.0), 0)
        pp += tl.sum(tl.load(MIX + base[:, :, None] * NP + r2[None, None, :], mask=m2[:, :, None], other=0.0), 0)
        if not HEAD:
            cc += tl.sum(tl.load(MIX + base[:, :, None] * NP + 2 * NS + rc[None, None, :],
                                 mask=m2[:, :, None] & first, other=0.0), 0)
    rho = 1.0 / tl.sqrt(ss / ND + norm_eps)
    s0 = tl.load(SCALE)
    i = tl.arange(0, NS)
    pp3 = tl.reshape(pp * rho[:, None], [BLOCK_T, 2, NS])
    half = tl.arange(0, 2)[None, :, None]
    pre_l = tl.sum(tl.where(half == 0, pp3, 0.0), 1)                                 # [BT, N]
    post_l = tl.sum(tl.where(half == 1, pp3, 0.0), 1)
    pre = tl.sigmoid(pre_l * s0 + tl.load(BASE + i)[None, :]) + eps
    if first and not HEAD:
        if MIXES is not None:
            mrow = MIXES + t.to(tl.int64)[:, None] * ((2 + NS) * NS)
            tl.store(mrow + r2[None, :], pp * rho[:, None], mask=tm[:, None])
            tl.store(mrow + 2 * NS + rc[None, :], cc * rho[:, None], mask=tm[:, None])
        if RHO is not None:
            tl.store(RHO + t, rho, mask=tm)
            tl.store(PRE + t[:, None] * NS + i[None, :], pre, mask=tm[:, None])
        if not DEFER:
            s1 = tl.load(SCALE + 1)
            s2 = tl.load(SCALE + 2)
            post = 2 * tl.sigmoid(post_l * s1 + tl.load(BASE + NS + i)[None, :])
            tl.store(POST + t[:, None] * NS + i[None, :], post, mask=tm[:, None])
            jk = i[:, None] * NS + i[None, :]
            c = tl.reshape(cc * rho[:, None], [BLOCK_T, NS, NS]) * s2 + tl.load(BASE + 2 * NS + jk)[None, :, :]
            c = _sinkhorn(c, eps, ITERS)
            tl.store(COMB + t.to(tl.int64)[:, None, None] * (NS * NS) + jk[None, :, :], c, mask=tm[:, None, None])
    dd = tl.arange(0, BLOCK_D)
    chunk = tl.program_id(1) - SEP
    d_lo = tl.where(chunk >= 0, chunk * D_PER, D)
    d_hi = tl.minimum(D, d_lo + D_PER)
    for d0 in range(d_lo, d_hi, BLOCK_D):
        dm = (d0 + dd) < d_hi
        off = t.to(tl.int64)[:, None, None] * ND + i[None, :, None] * D + (d0 + dd)[None, None, :]
        hv = tl.load(H + off, mask=tm[:, None, None] & dm[None, None, :], other=0.0).to(tl.float32)  # [BT, N, BD]
        x = tl.sum(pre[:, :, None] * hv, 1)
        tl.store(X + t.to(tl.int64)[:, None] * D + (d0 + dd)[None, :], x.to(X.dtype.element_ty),
                 mask=tm[:, None] & dm[None, :])


def hc_pre(h, fn, scale, base, n, iters, eps, norm_eps, block_t: int | None = None, block_k: int | None = None,
           programs: int | None = None, finish_block_t: int | None = None, save: bool = False,
           finish_warps: int | None = None, mix_precision: str | None = None,
           finish_programs: int | None = None, head: bool = False, defer: bool = False, partials=None):
    """x [.., D] (h's dtype), post [.., N], comb [.., N, N] fp32 from streams h [.., N, D]; with `head`, x
    alone, reduced with `hc_head`'s weights (fn [N, N·D], scale [1], base [N]); with `save`, also
    (mixes [T, (2+N)·N], rho [T], pre [T, N]) fp32 for `hc_pre_backward`. The mix GEMV is
    split over enough slices of N·D to give ~`programs` programs (one slice when tokens are many).
    Under the interpreter the defaults are few large programs (its cost is per program and per op).
    On sm90 (`bench/ptxas_report.py`): the mix at 16 tokens uses 138 registers, the finish at 8 tokens 168, no spills
    (the finish at 16 × 128 spills). Below 16 tokens (decode) the mix is a GEMV over one block of N·D
    per program (128 values: 0.070 ms vs 0.155 at 64 for one token on the H200, `bench_kernels --only
    hc`), as many programs as blocks up to `programs`; the finish reads the slices' partial sums in
    groups (a serial loop over V4-Flash's 128 slices took 47 µs). `finish_warps`: the finish's warps
    (its Sinkhorn is ~40 dependent reductions over [BLOCK_T, N, N]; fewer warps keep them inside one
    warp at a token or two; default 1 below 16 tokens, else 4: one V4-Flash token's mix + finish took
    6.7 µs with 1 warp, 7.8 with 2 and 7.9 with 4, `bench/probe_flash_decode.py --only hc`).
    `finish_programs`: with fewer token blocks than this, the finish's weighted sum over D is split into
    column ranges, one program each, beside the Sinkhorn's (decode: one token's 4 × 4,096 streams were one
    program's serial loop; 9.3-10.1 µs unsplit). `mix_precision`: the dot of the
    mix from 16 tokens: "bf16x3" (bf16 streams only: fn as three bf16 parts on the tensor cores, exact
    products; the default for bf16 streams on a GPU), "ieee" (fp32 FMA; the default otherwise) or
    "tf32x3" (three TF32 products).

    `defer` (inference): x and a `PendingMix` in place of post, with comb None: the finish stores the
    scaled mix logits and `hc_post` computes post and comb from them (the Sinkhorn's ~40 dependent
    reductions then run before hc_post's wait for its predecessor, beside the sublayer's last kernel,
    instead of in the finish, which the sublayer waits for).

    `partials` = (ss [C, T], mix [C, T, NP]): the mix's partial sums over C slices, already computed (by
    hc_post's launch, `hc_post_pre`); only the finish runs."""
    if head and save:
        raise ValueError("mHC kernel: the head reduction saves nothing for a backward pass (inference only)")
    if defer and (head or save):
        raise ValueError("mHC kernel: `defer` is for hc_pre's inference form (not `head`, not `save`)")
    prec = mix_precision or ("bf16x3" if h.dtype == torch.bfloat16 and not INTERPRET else "ieee")
    if prec == "bf16x3" and h.dtype != torch.bfloat16:
        raise ValueError(f"mHC kernel: mix_precision 'bf16x3' needs bf16 streams, got {h.dtype}")
    # H200, 4,096 tokens × 4 × 2,048 (`bench_kernels --only hc1b`): bf16x3 0.153 ms at 32-token blocks,
    # 0.086 at 128 (the FMA form, "ieee", 0.361 at 32); the 128-token block spills 696 B
    # (`bench/ptxas_report.py`) and is still the fastest measured
    block_t = block_t or (128 if INTERPRET or prec == "bf16x3" else 32)
    finish_block_t = finish_block_t or (128 if INTERPRET else 8)
    programs = programs or (1 if INTERPRET else 264)
    if n & (n - 1):
        raise ValueError(f"mHC kernel: hc_mult {n} must be a power of two")
    lead, D = h.shape[:-2], h.shape[-1]
    hv = h.reshape(-1, n, D).contiguous()
    T = hv.shape[0]
    x = torch.empty(T, D, device=h.device, dtype=h.dtype)
    post = x if head else torch.empty(T, n, device=h.device, dtype=torch.float32)
    comb = x if head else torch.empty(T, n, n, device=h.device, dtype=torch.float32)
    saved = (torch.empty(T, (2 + n) * n, device=h.device, dtype=torch.float32),
             torch.empty(T, device=h.device, dtype=torch.float32),
             torch.empty(T, n, device=h.device, dtype=torch.float32)) if save else (None, None, None)
    if defer:
        saved = (torch.empty(T, (2 + n) * n, device=h.device, dtype=torch.float32), None, None)
    if T:
        nd = n * D
        if T < 16:
            block_k = block_k or 128
            block_t = next_pow2(T)
            split = max(1, min(programs, cdiv(nd, block_k)))
        else:
            block_k = block_k or 64
            block_t = min(block_t, max(16, next_pow2(T)))
            split = max(1, min(cdiv(programs, cdiv(T, block_t)), cdiv(nd, 4 * block_k)))
        tb = cdiv(T, block_t)
        k_per = cdiv(cdiv(nd, split), block_k) * block_k
        split = cdiv(nd, k_per)
        n_pad = max(16, next_pow2(2 * n if head else (2 + n) * n))
        split3 = prec == "bf16x3" and block_t >= 16
        if partials is not None:
            ss, mix = partials
            split, n_pad = ss.shape[0], mix.shape[-1]
        else:
            ss = torch.empty(split, T, device=h.device, dtype=torch.float32)
            mix = torch.empty(split, T, n_pad, device=h.device, dtype=torch.float32)
            _hc_mix_kernel[(tb, split)](hv, fn.float().contiguous(), ss, mix, T, D, k_per, NS=n, NP=n_pad,
                                        BLOCK_T=block_t, BLOCK_K=block_k,
                                        PREC="ieee" if INTERPRET or prec == "bf16x3" else prec,
                                        SPLIT3=split3, F32_DOT=INTERPRET, HEAD=head, **pdl(hv))
        finish_block_t = min(finish_block_t, next_pow2(T))
        block_d = min(max(128, 1024 // finish_block_t), next_pow2(D))
        tbf = cdiv(T, finish_block_t)
        chunks = max(1, min(cdiv(D, block_d), (finish_programs or (1 if INTERPRET else 264)) // tbf))
        d_per = cdiv(cdiv(D, chunks), block_d) * block_d
        chunks = cdiv(D, d_per)
        sep = int(chunks > 1 and not head)         # the Sinkhorn's program beside the column ranges
        _hc_finish_kernel[(tbf, chunks + sep)](
            hv, ss, mix, scale.float().contiguous(), base.float().contiguous(), x, post, comb, T, D, split, d_per,
            sep, eps, norm_eps, *saved, ITERS=iters, NS=n, NP=n_pad, BLOCK_T=finish_block_t, BLOCK_D=block_d,
            SPLIT_BLOCK=min(64 // finish_block_t if finish_block_t < 64 else 1, next_pow2(split)),
            HEAD=head, DEFER=defer, num_warps=finish_warps or (1 if T < 16 else 4),
            **pdl(hv))
    if head:
        return x.view(*lead, D)
    if defer:
        return x.view(*lead, D), PendingMix(saved[0], scale, base, n, iters, eps, tuple(lead)), None
    out = x.view(*lead, D), post.view(*lead, n), comb.view(*lead, n, n)
    return (*out, saved) if save else out


@launchable
@triton.jit
def _hc_post_kernel(F, H, POST, COMB, OUT, N_TOK, D, MIX, SCALE, BASE, eps, F2, FN, SS_OUT, MIX_OUT,
                    NS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, ITERS: tl.constexpr = 1,
                    DEFER: tl.constexpr = False, ADD: tl.constexpr = False, NP: tl.constexpr = 0,
                    PDL: tl.constexpr = False):
    """out[t, k] = post[t, k] · f[t] + Σ_j comb[t, j, k] · h[t, j] in fp32, for BLOCK_T × BLOCK_D.
    ADD: f = F + F2 rounded to F's dtype (as a separate add of the two tensors rounds it).
    NP > 0: also the next hc_pre's mix partials of this program's block of the stored (rounded) out, as
    `_hc_mix_kernel` writes them for one slice: Σ out² into SS_OUT[c, t] and out · fnᵀ (fn [(2+N)·N, N·D],
    read as NP rows) into MIX_OUT[c, t, :NP], c = program_id(1) (slices of BLOCK_D columns of every stream).

    DEFER: post and comb computed here from the scaled mix logits MIX [T, (2+N)·N] (hc_pre's finish with
    `defer`): post = 2·sigmoid(logit · scale[1] + base), comb = Sinkhorn(logit · scale[2] + base), the
    finish's arithmetic. That runs before the wait for the previous launch: MIX is written by a launch at
    least two back in the stream (hc_pre's finish, then the sublayer's launches), and with PDL a launch
    starts only after its predecessor has passed its own wait, so every launch before that one is complete."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < N_TOK
    i = tl.arange(0, NS)
    t64 = t.to(tl.int64)
    if DEFER:
        row = MIX + t64[:, None] * ((2 + NS) * NS)
        post = 2 * tl.sigmoid(tl.load(row + NS + i[None, :], mask=tm[:, None], other=0.0) * tl.load(SCALE + 1)
                              + tl.load(BASE + NS + i)[None, :])                          # [BT, N]
        jk = i[:, None] * NS + i[None, :]
        comb = tl.load(row[:, :, None] + 2 * NS + jk[None, :, :], mask=tm[:, None, None], other=0.0) \
            * tl.load(SCALE + 2) + tl.load(BASE + 2 * NS + jk)[None, :, :]
        comb = _sinkhorn(comb, eps, ITERS)                                             # [BT, N(j), N(k)]
        pdl_start(PDL)
    else:
        pdl_start(PDL)
        post = tl.load(POST + t64[:, None] * NS + i[None, :], mask=tm[:, None], other=0.0)       # [BT, N]
        comb = tl.load(COMB + t64[:, None, None] * (NS * NS) + i[None, :, None] * NS + i[None, None, :],
                       mask=tm[:, None, None], other=0.0)                              # [BT, N(j), N(k)]
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = d < D
    m3 = tm[:, None, None] & dm[None, None, :]
    hv = tl.load(H + t64[:, None, None] * (NS * D) + i[None, :, None] * D + d[None, None, :], mask=m3,
                 other=0.0).to(tl.float32)                                             # [BT, N(j), BD]
    fv = tl.load(F + t64[:, None] * D + d[None, :], mask=tm[:, None] & dm[None, :], other=0.0)
    if ADD:
        f2 = tl.load(F2 + t64[:, None] * D + d[None, :], mask=tm[:, None] & dm[None, :], other=0.0)
        fv = (fv.to(tl.float32) + f2.to(tl.float32)).to(F.dtype.element_ty)
    fv = fv.to(tl.float32)
    mixed = tl.sum(comb[:, :, :, None] * hv[:, :, None, :], 1)                          # [BT, N(k), BD]
    out = (post[:, :, None] * fv[:, None, :] + mixed).to(OUT.dtype.element_ty)
    tl.store(OUT + t64[:, None, None] * (NS * D) + i[None, :, None] * D + d[None, None, :], out, mask=m3)
    if NP > 0:
        ov = tl.where(m3, out.to(tl.float32), 0.0)                                     # [BT, N, BD]
        r = tl.arange(0, NP)
        col = i[:, None] * D + d[None, :]                                              # [N, BD]: fn's columns
        fn = tl.load(FN + r[None, None, :].to(tl.int64) * (NS * D) + col[:, :, None],
                     mask=dm[None, :, None] & (r < (2 + NS) * NS)[None, None, :], other=0.0)   # [N, BD, NP]
        acc = tl.sum(tl.sum(ov[:, :, :, None] * fn[None, :, :, :], 2), 1)             # [BT, NP]
        row = (tl.program_id(1) * N_TOK + t).to(tl.int64)
        tl.store(SS_OUT + row, tl.sum(tl.sum(ov * ov, 2), 1), mask=tm)
        tl.store(MIX_OUT + row[:, None] * NP + r[None, :], acc, mask=tm[:, None])


def hc_post(f, residual, post, comb, block_t: int | None = None, block_d: int = 128, add=None, mix_out=None):
    """[.., N, D] in residual's dtype: post_k · f + Σ_j comb[j, k] · h_j (fp32 arithmetic). `post` may be
    a `PendingMix` (hc_pre with `defer`; comb None): post and comb are computed in the kernel. `add` (f's
    shape and dtype): f + add, rounded to f's dtype, takes f's place. `mix_out` = (fn fp32, ss [C, T], mix
    [C, T, NP]): also the next hc_pre's mix partials (`hc_post_pre`), C = ⌈D / block_d⌉ slices."""
    if add is not None and (add.shape != f.shape or add.dtype != f.dtype):
        raise ValueError(f"mHC kernel: add {add.dtype} {tuple(add.shape)} must match f {f.dtype} {tuple(f.shape)}")
    n, D = residual.shape[-2:]
    if n & (n - 1):
        raise ValueError(f"mHC kernel: hc_mult {n} must be a power of two")
    hv = residual.reshape(-1, n, D).contiguous()
    T = hv.shape[0]
    out = torch.empty_like(hv)
    pending = post if isinstance(post, PendingMix) else None
    if pending is not None and (pending.n != n or pending.mixes.shape[0] != T):
        raise ValueError(f"mHC kernel: pending mix logits of {pending.mixes.shape[0]} tokens and {pending.n} "
                         f"streams for a residual of {T} tokens and {n}")
    # (one token or a few, the deferred form: one program row per token, one warp)
    block_t = block_t or (64 if INTERPRET else next_pow2(T) if (pending is not None or mix_out) and T < 4 else 4)
    if T:
        bd = min(block_d, next_pow2(D))
        if pending is not None:
            mix = pending.mixes
            args = (out, out, out, T, D, mix, pending.scale.float().contiguous(), pending.base.float().contiguous(),
                    pending.eps)
            extra = dict(ITERS=pending.iters, DEFER=True,
                         num_warps=1 if T < 16 and not INTERPRET and mix_out is None else 4)
        else:
            args = (post.reshape(T, n).float().contiguous(), comb.reshape(T, n, n).float().contiguous(), out, T, D,
                    out, out, out, 0.0)
            extra = {}
        f2 = {} if add is None else dict(ADD=True)
        mo = (out, out, out) if mix_out is None else mix_out[:3]
        if mix_out is not None:
            if mix_out[1].shape[0] != cdiv(D, bd):
                raise ValueError(f"mHC kernel: mix partials for {mix_out[1].shape[0]} slices, the launch has "
                                 f"{cdiv(D, bd)}")
            f2["NP"] = mix_out[2].shape[-1]
        _hc_post_kernel[(cdiv(T, block_t), cdiv(D, bd))](
            f.reshape(T, D).contiguous(), hv, *args, out if add is None else add.reshape(T, D).contiguous(), *mo,
            NS=n, BLOCK_T=block_t, BLOCK_D=bd, **extra, **f2, **pdl(out))
    return out.view(residual.shape)


POST_PRE_MAX_TOKENS = 2      # `hc_post_pre` fuses up to this many tokens (its [T, N, BD, NP] products)
POST_PRE_BLOCK_D = 32        # columns of every stream per program: 128 programs at V4-Flash's D = 4096


def hc_post_pre(f, residual, post, comb, fn, scale, base, n, iters, eps, norm_eps, add=None, defer=False):
    """(h' = hc_post(f, residual, post, comb, add=add), hc_pre(h', fn, ...)) for a decode step's few
    tokens, with hc_pre's mix (Σ h'² and h' · fnᵀ) computed in hc_post's launch from the values it stores:
    two launches (post + mix, finish) where the separate calls take three. The partial sums are taken
    over other slices than `_hc_mix_kernel`'s, so the mix logits equal the separate calls' up to fp32
    summation order. More than `POST_PRE_MAX_TOKENS` tokens: the separate calls."""
    T = residual.numel() // (residual.shape[-1] * n)
    if T > POST_PRE_MAX_TOKENS or n & (n - 1):
        h = hc_post(f, residual, post, comb, add=add)
        return h, hc_pre(h, fn, scale, base, n, iters, eps, norm_eps, defer=defer)
    D = residual.shape[-1]
    bd = min(POST_PRE_BLOCK_D, next_pow2(D))
    n_pad = max(16, next_pow2((2 + n) * n))
    ss = torch.empty(cdiv(D, bd), T, device=residual.device, dtype=torch.float32)
    mix = torch.empty(cdiv(D, bd), T, n_pad, device=residual.device, dtype=torch.float32)
    h = hc_post(f, residual, post, comb, block_d=bd, add=add, mix_out=(fn.float().contiguous(), ss, mix))
    return h, hc_pre(h, fn, scale, base, n, iters, eps, norm_eps, defer=defer, partials=(ss, mix))


@triton.jit
def _norm_step(c, j, eps):
    """Normalisation step j ≥ 1 of the Sinkhorn sequence: j = 1 and odd j divide by column sums, even j by
    row sums (comb [BLOCK, N, N], sums over axis 1 = columns, axis 2 = rows)."""
    if j % 2 == 1:
        c = c / (tl.sum(c, 1)[:, None, :] + eps)
    else:
        c = c / (tl.sum(c, 2)[:, :, None] + eps)
    return c


@launchable
@triton.jit
def _sinkhorn_bwd_kernel(MIX, SCALE, BASE, DPRE, DPOST, DCOMB, DMIX, DSB, N_TOK, eps,
                         ITERS: tl.constexpr, NS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """Gradient of `split_sinkhorn` for BLOCK tokens. The 2·ITERS − 1 normalisation steps are replayed
    from the softmax for each step's input (ITERS² cheap in-register steps, no stored history).
    DSB [grid, 3 + (2+N)·N]: this block's partial sums for d scale and d base."""
    pdl_start(PDL)
    pid = tl.program_id(0)
    t = pid * BLOCK + tl.arange(0, BLOCK)
    tm = t < N_TOK
    i = tl.arange(0, NS)
    width = (2 + NS) * NS
    row = MIX + t.to(tl.int64)[:, None] * width
    drow = DMIX + t.to(tl.int64)[:, None] * width
    s0 = tl.load(SCALE)
    s1 = tl.load(SCALE + 1)
    s2 = tl.load(SCALE + 2)
    # gates: pre = σ(a s0 + b) + eps, post = 2 σ(a s1 + b)
    a_pre = tl.load(row + i[None, :], mask=tm[:, None], other=0.0)
    a_post = tl.load(row + NS + i[None, :], mask=tm[:, None], other=0.0)
    g_pre = tl.sigmoid(a_pre * s0 + tl.load(BASE + i)[None, :])
    g_post = tl.sigmoid(a_post * s1 + tl.load(BASE + NS + i)[None, :])
    dz_pre = tl.load(DPRE + t[:, None] * NS + i[None, :], mask=tm[:, None], other=0.0) * g_pre * (1 - g_pre)
    dz_post = 2 * tl.load(DPOST + t[:, None] * NS + i[None, :], mask=tm[:, None], other=0.0) * g_post * (1 - g_post)
    tl.store(drow + i[None, :], dz_pre * s0, mask=tm[:, None])
    tl.store(drow + NS + i[None, :], dz_post * s1, mask=tm[:, None])
    # comb: c0 = softmax(a s2 + b) + eps, then the normalisation steps 1 .. 2·ITERS − 1
    jk = i[:, None] * NS + i[None, :]
    a_c = tl.load(row[:, :, None] + 2 * NS + jk[None, :, :], mask=tm[:, None, None], other=0.0)
    z = a_c * s2 + tl.load(BASE + 2 * NS + jk)[None, :, :]
    p = tl.exp(z - tl.max(z, 2)[:, :, None])
    p = p / tl.sum(p, 2)[:, :, None]
    c0 = p + eps
    g = tl.load(DCOMB + t.to(tl.int64)[:, None, None] * (NS * NS) + jk[None, :, :], mask=tm[:, None, None], other=0.0)
    for jj in range(0, 2 * ITERS - 1):
        j = 2 * ITERS - 1 - jj                       # backward through step j: needs its input x_{j-1}
        x = c0
        for r in range(1, j):
            x = _norm_step(x, r, eps)
        if j % 2 == 1:       # (each branch keeps its own sums: only g, of one shape, leaves the if)
            sc = tl.sum(x, 1)[:, None, :] + eps
            g = g / sc - tl.sum(g * x, 1)[:, None, :] / (sc * sc)
        else:
            sr = tl.sum(x, 2)[:, :, None] + eps
            g = g / sr - tl.sum(g * x, 2)[:, :, None] / (sr * sr)
    dz = p * (g - tl.sum(g * p, 2)[:, :, None])                                     # softmax backward
    dz = tl.where(tm[:, None, None], dz, 0.0)
    tl.store(drow[:, :, None] + 2 * NS + jk[None, :, :], dz * s2, mask=tm[:, None, None])
    # partial sums of d scale and d base over this block's tokens
    out = DSB + pid * (3 + width)
    dz_pre = tl.where(tm[:, None], dz_pre, 0.0)
    dz_post = tl.where(tm[:, None], dz_post, 0.0)
    tl.store(out, tl.sum(tl.sum(dz_pre * a_pre, 1), 0))
    tl.store(out + 1, tl.sum(tl.sum(dz_post * a_post, 1), 0))
    tl.store(out + 2, tl.sum(tl.sum(tl.sum(dz * a_c, 2), 1), 0))
    tl.store(out + 3 + i, tl.sum(dz_pre, 0))
    tl.store(out + 3 + NS + i, tl.sum(dz_post, 0))
    tl.store(out + 3 + 2 * NS + jk, tl.sum(dz, 0))


def split_sinkhorn_backward(mixes, scale, base, n, iters, eps, dpre, dpost, dcomb, block: int = 64):
    """(d mixes, d scale, d base) of `split_sinkhorn` given the output gradients (None = zeros)."""
    lead = mixes.shape[:-1]
    width = (2 + n) * n
    mix = mixes.float().reshape(-1, width).contiguous()
    T = mix.shape[0]
    z = lambda shape: torch.zeros(shape, device=mix.device, dtype=torch.float32)
    dpre = z((T, n)) if dpre is None else dpre.float().reshape(T, n).contiguous()
    dpost = z((T, n)) if dpost is None else dpost.float().reshape(T, n).contiguous()
    dcomb = z((T, n, n)) if dcomb is None else dcomb.float().reshape(T, n, n).contiguous()
    dmix = torch.empty_like(mix)
    grid = cdiv(T, block)
    dsb = z((max(grid, 1), 3 + width))
    if T:
        _sinkhorn_bwd_kernel[(grid,)](mix, scale.float().contiguous(), base.float().contiguous(), dpre, dpost, dcomb,
                                      dmix, dsb, T, eps, ITERS=iters, NS=n, BLOCK=block, **pdl(mix))
    sums = dsb.sum(0)
    return dmix.view(*lead, width), sums[:3], sums[3:]


# ----------------------------------------------------------------------------- backward of hc_post and hc_pre
# Reductions over D are split over programs only when tokens are few (partial sums per slice of D, summed
# afterwards in a fixed order: deterministic, no atomics); with many tokens one program per token block
# loops over all of D.
def _split(n_items: int, block: int, other_programs: int, programs: int) -> tuple[int, int]:
    """(items per slice, slices): `n_items` cut into block-multiple slices, enough of them to give about
    `programs` programs beside `other_programs` (one slice when those are already enough)."""
    split = max(1, min(cdiv(programs, other_programs), cdiv(n_items, block)))
    per = cdiv(cdiv(n_items, split), block) * block
    return per, cdiv(n_items, per)


@launchable
@triton.jit
def _hc_post_bwd_kernel(G, F, H, POST, COMB, DF, DH, DPOST, DCOMB, N_TOK, D, D_PER, NS: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr = False):
    """Gradients of `_hc_post_kernel` for BLOCK_T tokens over one slice [D_PER·s, D_PER·(s+1)) of D, one
    pass over g, f, h: df = Σ_k post_k g_k and dh_j = Σ_k comb[j, k] g_k stored per column block;
    dpost_k = Σ_d g_k f and dcomb[j, k] = Σ_d h_j g_k summed over the slice (partial sums per slice).
    The output streams k one at a time (g_k [BT, BD]), so that every product is at most [BT, N, BD] and
    every sum runs over the columns (a [BT, N, N, BD] product took 2-6x longer on the H200)."""
    pdl_start(PDL)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    sp = tl.program_id(1)
    tm = t < N_TOK
    i = tl.arange(0, NS)
    t64 = t.to(tl.int64)
    dpost = tl.zeros([BLOCK_T, NS], tl.float32)
    dcomb = tl.zeros([BLOCK_T, NS, NS], tl.float32)                                    # [BT, N(j), N(k)]
    dd = tl.arange(0, BLOCK_D)
    d_hi = tl.minimum(D, (sp + 1) * D_PER)
    for d0 in range(sp * D_PER, d_hi, BLOCK_D):
        d = d0 + dd
        dm = d < d_hi
        m2 = tm[:, None] & dm[None, :]
        m3 = tm[:, None, None] & dm[None, None, :]
        off = t64[:, None, None] * (NS * D) + i[None, :, None] * D + d[None, None, :]
        hv = tl.load(H + off, mask=m3, other=0.0).to(tl.float32)                       # [BT, N(j), BD]
        fv = tl.load(F + t64[:, None] * D + d[None, :], mask=m2, other=0.0).to(tl.float32)    # [BT, BD]
        df = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        dh = tl.zeros([BLOCK_T, NS, BLOCK_D], tl.float32)
        for k in tl.static_range(NS):
            gk = tl.load(G + t64[:, None] * (NS * D) + k * D + d[None, :], mask=m2, other=0.0).to(tl.float32)
            pk = tl.load(POST + t64 * NS + k, mask=tm, other=0.0)                                 # [BT]
            ck = tl.load(COMB + t64[:, None] * (NS * NS) + i[None, :] * NS + k, mask=tm[:, None], other=0.0)
            df += pk[:, None] * gk
            dh += ck[:, :, None] * gk[:, None, :]
            dpost += tl.where(i[None, :] == k, tl.sum(gk * fv, 1)[:, None], 0.0)
            dcomb += tl.where(i[None, None, :] == k, tl.sum(hv * gk[:, None, :], 2)[:, :, None], 0.0)
        tl.store(DF + t64[:, None] * D + d[None, :], df.to(DF.dtype.element_ty), mask=m2)
        tl.store(DH + off, dh.to(DH.dtype.element_ty), mask=m3)
    base = (sp * N_TOK + t).to(tl.int64)
    tl.store(DPOST + base[:, None] * NS + i[None, :], dpost, mask=tm[:, None])
    tl.store(DCOMB + base[:, None, None] * (NS * NS) + i[None, :, None] * NS + i[None, None, :], dcomb,
             mask=tm[:, None, None])


def hc_post_backward(grad, f, residual, post, comb, block_t: int | None = None, block_d: int = 256,
                     programs: int | None = None):
    """(df, dh, dpost, dcomb) of `hc_post` given the gradient of its output: df in f's dtype, dh in the
    residual's, dpost and dcomb fp32; shapes of the inputs. H200, 4,096 tokens × 4 × 4,096 bf16: 131 µs at
    4 tokens × 256 columns (3.6 TB/s of g, h, f, dh, df), 150 µs at 4 × 128 or 8 × 128; forward + backward
    0.43 ms against 3.15 for the twin's autograd."""
    block_t = block_t or (64 if INTERPRET else 4)
    programs = programs or (1 if INTERPRET else 264)
    n, D = residual.shape[-2:]
    hv = residual.reshape(-1, n, D).contiguous()
    T = hv.shape[0]
    g = grad.reshape(T, n, D).contiguous()
    fv = f.reshape(T, D).contiguous()
    df = torch.empty_like(fv)
    dh = torch.empty_like(hv)
    bd = min(block_d, next_pow2(D))
    tb = cdiv(T, block_t)
    d_per, split = _split(D, bd, max(tb, 1), programs)
    dpost = torch.empty(split, T, n, device=hv.device, dtype=torch.float32)
    dcomb = torch.empty(split, T, n, n, device=hv.device, dtype=torch.float32)
    if T:
        _hc_post_bwd_kernel[(tb, split)](g, fv, hv, post.reshape(T, n).float().contiguous(),
                                         comb.reshape(T, n, n).float().contiguous(), df, dh, dpost, dcomb, T, D,
                                         d_per, NS=n, BLOCK_T=block_t, BLOCK_D=bd, **pdl(g))
    dpost = dpost[0] if split == 1 else dpost.sum(0)
    dcomb = dcomb[0] if split == 1 else dcomb.sum(0)
    return df.view(f.shape), dh.view(residual.shape), dpost.view(post.shape), dcomb.view(comb.shape)


@launchable
@triton.jit
def _hc_pre_dpre_kernel(DX, H, DPRE, N_TOK, D, D_PER, NS: tl.constexpr, BLOCK_T: tl.constexpr,
                        BLOCK_D: tl.constexpr, PDL: tl.constexpr = False):
    """hc_pre backward, part 1: dpre_n = Σ_d dx · h_n for BLOCK_T tokens over one slice of D (partial
    sums per slice)."""
    pdl_start(PDL)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    sp = tl.program_id(1)
    tm = t < N_TOK
    i = tl.arange(0, NS)
    t64 = t.to(tl.int64)
    acc = tl.zeros([BLOCK_T, NS], tl.float32)
    dd = tl.arange(0, BLOCK_D)
    d_hi = tl.minimum(D, (sp + 1) * D_PER)
    for d0 in range(sp * D_PER, d_hi, BLOCK_D):
        d = d0 + dd
        dm = d < d_hi
        hv = tl.load(H + t64[:, None, None] * (NS * D) + i[None, :, None] * D + d[None, None, :],
                     mask=tm[:, None, None] & dm[None, None, :], other=0.0).to(tl.float32)     # [BT, N, BD]
        dx = tl.load(DX + t64[:, None] * D + d[None, :], mask=tm[:, None] & dm[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(hv * dx[:, None, :], 2)
    tl.store(DPRE + (sp * N_TOK + t).to(tl.int64)[:, None] * NS + i[None, :], acc, mask=tm[:, None])


@launchable
@triton.jit
def _hc_pre_dz_kernel(DMIX, MIXES, RHO, DZ, C, N_TOK, ND, WIDTH: tl.constexpr, NP: tl.constexpr,
                      BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """hc_pre backward, part 2 (after the Sinkhorn backward): with mixes = z·rho, z = v·fnᵀ,
    dz = dmixes·rho (stored as NP columns, zeros past WIDTH) and c = (Σ dmixes·mixes)·rho²/(N·D), the
    factor of v in the RMS term of dv."""
    pdl_start(PDL)
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tm = t < N_TOK
    r = tl.arange(0, NP)
    m = tm[:, None] & (r < WIDTH)[None, :]
    off = t.to(tl.int64)[:, None] * WIDTH + r[None, :]
    dmix = tl.load(DMIX + off, mask=m, other=0.0)
    mix = tl.load(MIXES + off, mask=m, other=0.0)
    rho = tl.load(RHO + t, mask=tm, other=0.0)
    tl.store(DZ + t.to(tl.int64)[:, None] * NP + r[None, :], dmix * rho[:, None], mask=tm[:, None])
    tl.store(C + t, tl.sum(dmix * mix, 1) * rho * rho / ND, mask=tm)


@launchable
@triton.jit
def _hc_pre_bwd_kernel(DX, H, FN, DZ, C, PRE, DH, DFN, N_TOK, D, T_PER, NS: tl.constexpr, NP: tl.constexpr,
                       WIDTH: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
                       SPLIT3: tl.constexpr = False, F32_DOT: tl.constexpr = False, PDL: tl.constexpr = False):
    """hc_pre backward, part 3, for stream n and one column block of D (program 0's index n fastest, so
    the N programs of a column block read the same dx), over the tokens of one slice [T_PER·s,
    T_PER·(s+1)): dh_n = pre_n·dx + dz·fn[:, n·D + d] − c·h_n in one pass over h, and
    dfn[:, n·D + d] = Σ_t dzᵀ h_n (partial sums per slice of tokens), both as fp32 dots.

    SPLIT3 (bf16 streams): bf16 tensor-core dots on split operands: dz = dz1 + dz2 + dz3 and fn = f1 + f2
    (bf16 parts, as in `_hc_mix_kernel`); dfn = Σ_p dz_pᵀ h (h is bf16: exact products, fp32 accuracy) and
    dz·fn ≈ dz1·f1 + dz1·f2 + dz2·f1 (~2⁻¹⁶ relative, below the bf16 rounding of dh). F32_DOT: the same
    dots on fp32 copies of the parts (the interpreter)."""
    pdl_start(PDL)
    n = tl.program_id(0) % NS
    d = (tl.program_id(0) // NS) * BLOCK_D + tl.arange(0, BLOCK_D)
    sp = tl.program_id(1)
    dm = d < D
    ND = NS * D
    col = n * D + d
    r = tl.arange(0, NP)
    fn = tl.load(FN + r[:, None].to(tl.int64) * ND + col[None, :], mask=(r < WIDTH)[:, None] & dm[None, :],
                 other=0.0)                                                           # [NP, BD]
    f1, f2, _ = _split_bf16(fn)
    acc = tl.zeros([NP, BLOCK_D], tl.float32)
    tt = tl.arange(0, BLOCK_T)
    t_hi = tl.minimum(N_TOK, (sp + 1) * T_PER)
    for t0 in range(sp * T_PER, t_hi, BLOCK_T):
        t = t0 + tt
        tm = t < t_hi
        t64 = t.to(tl.int64)
        m2 = tm[:, None] & dm[None, :]
        dz = tl.load(DZ + t64[:, None] * NP + r[None, :], mask=tm[:, None], other=0.0)     # [BT, NP]
        c = tl.load(C + t, mask=tm, other=0.0)
        pre = tl.load(PRE + t64 * NS + n, mask=tm, other=0.0)
        hraw = tl.load(H + t64[:, None] * ND + col[None, :], mask=m2, other=0.0)               # [BT, BD]
        hv = hraw.to(tl.float32)
        dx = tl.load(DX + t64[:, None] * D + d[None, :], mask=m2, other=0.0).to(tl.float32)
        if SPLIT3:
            dz1, dz2, dz3 = _split_bf16(dz)
            if F32_DOT:
                mixed = tl.dot(dz1.to(tl.float32), f2.to(tl.float32), input_precision="ieee")
                mixed += tl.dot(dz2.to(tl.float32), f1.to(tl.float32), input_precision="ieee")
                mixed += tl.dot(dz1.to(tl.float32), f1.to(tl.float32), input_precision="ieee")
                acc += tl.dot(tl.trans(dz3.to(tl.float32)), hv, input_precision="ieee")
                acc += tl.dot(tl.trans(dz2.to(tl.float32)), hv, input_precision="ieee")
                acc += tl.dot(tl.trans(dz1.to(tl.float32)), hv, input_precision="ieee")
            else:
                hb = hraw.to(tl.bfloat16)
                mixed = tl.dot(dz1, f2)
                mixed = tl.dot(dz2, f1, mixed)
                mixed = tl.dot(dz1, f1, mixed)
                acc = tl.dot(tl.trans(dz3), hb, acc)
                acc = tl.dot(tl.trans(dz2), hb, acc)
                acc = tl.dot(tl.trans(dz1), hb, acc)
        else:
            mixed = tl.dot(dz, fn, input_precision=PREC)
            acc += tl.dot(tl.trans(dz), hv, input_precision=PREC)
        dh = pre[:, None] * dx + mixed - c[:, None] * hv
        tl.store(DH + t64[:, None] * ND + col[None, :], dh.to(DH.dtype.element_ty), mask=m2)
    tl.store(DFN + (sp * WIDTH + r[:, None]).to(tl.int64) * ND + col[None, :], acc,
             mask=(r < WIDTH)[:, None] & dm[None, :])


def hc_pre_backward(h, fn, scale, base, saved, n, iters, eps, dx, dpost, dcomb, block_t: int | None = None,
                    block_d: int | None = None, programs: int | None = None, prec: str | None = None,
                    sinkhorn_block: int | None = None):
    """(dh, dfn, dscale, dbase) of `hc_pre` given the gradients of x, post, comb (None = zeros) and the
    forward's `saved` (mixes, rho, pre) (`hc_pre(..., save=True)`): dh in h's dtype, the others fp32.
    Two passes over h: dpre (part 1), then the Sinkhorn backward on the [T, (2+N)·N] logits and dz, c
    (part 2), then dh and dfn together (part 3). Part 3's dots on a GPU: bf16 tensor-core dots on split
    operands for bf16 streams ("bf16x3", `_hc_pre_bwd_kernel`), else fp32 as 3 TF32 products ("tf32x3":
    the same error as the FMA form against float64 here, ~2e-7). H200, 4,096 tokens × 4 × 4,096
    bf16: part 1 46 µs, the Sinkhorn backward ~100 µs in blocks of 8 tokens (177 µs in blocks of 64),
    part 3 ~270 µs at 64 tokens × 64 columns (315 at 32 × 64; "ieee" FMA dots at best 336; 64 × 64 shows
    260 B of spills in ptxas, yet measured fastest); forward + backward 1.18 ms against 3.15 for the twin's
    autograd, of which the forward's mix GEMV (`_hc_mix_kernel`, fp32 FMA dot) is 0.65 ms."""
    mixes, rho, pre = saved
    D = h.shape[-1]
    hv = h.reshape(-1, n, D).contiguous()
    T = hv.shape[0]
    width, nd = (2 + n) * n, n * D
    n_pad = max(16, next_pow2(width))
    programs = programs or (1 if INTERPRET else 264)
    prec = prec or ("ieee" if INTERPRET else "bf16x3" if h.dtype == torch.bfloat16 else "tf32x3")
    if prec == "bf16x3" and h.dtype != torch.bfloat16:
        raise ValueError(f"mHC kernel: prec 'bf16x3' needs bf16 streams, got {h.dtype}")
    sinkhorn_block = sinkhorn_block or (64 if INTERPRET else 8)
    dx = torch.zeros(T, D, device=h.device, dtype=h.dtype) if dx is None else dx.reshape(T, D).contiguous()
    # part 1: dpre
    bt = block_t or (64 if INTERPRET else 8)
    bd = min(block_d or 128, next_pow2(D))
    tb = cdiv(T, bt)
    d_per, split = _split(D, bd, max(tb, 1), programs)
    dpre = torch.empty(split, T, n, device=h.device, dtype=torch.float32)
    if T:
        _hc_pre_dpre_kernel[(tb, split)](dx, hv, dpre, T, D, d_per, NS=n, BLOCK_T=bt, BLOCK_D=bd, **pdl(dx))
    dpre = dpre[0] if split == 1 else dpre.sum(0)
    # part 2: Sinkhorn backward, then dz and c
    dmix, dscale, dbase = split_sinkhorn_backward(mixes, scale, base, n, iters, eps, dpre, dpost, dcomb,
                                                  block=sinkhorn_block)
    dz = torch.empty(T, n_pad, device=h.device, dtype=torch.float32)
    c = torch.empty(T, device=h.device, dtype=torch.float32)
    if T:
        _hc_pre_dz_kernel[(cdiv(T, 64),)](dmix, mixes, rho, dz, c, T, nd, WIDTH=width, NP=n_pad, BLOCK=64,
        **pdl(dmix))
    # part 3: dh and dfn
    bt = min(block_t or 64, max(16, next_pow2(T)))
    bd = min(block_d or (128 if INTERPRET else 64), next_pow2(D))
    cols = n * cdiv(D, bd)
    t_per, tsplit = _split(max(T, 1), bt, cols, programs)
    dh = torch.empty_like(hv)
    dfn = (torch.empty if T else torch.zeros)(tsplit, width, nd, device=h.device, dtype=torch.float32)
    if T:
        _hc_pre_bwd_kernel[(cols, tsplit)](dx, hv, fn.float().contiguous(), dz, c, pre, dh, dfn, T, D, t_per,
                                           NS=n, NP=n_pad, WIDTH=width, BLOCK_T=bt, BLOCK_D=bd,
                                           PREC="ieee" if INTERPRET or prec == "bf16x3" else prec,
                                           SPLIT3=prec == "bf16x3", F32_DOT=INTERPRET, **pdl(dx))
    dfn = dfn[0] if tsplit == 1 else dfn.sum(0)
    return dh.view(h.shape), dfn, dscale, dbase
