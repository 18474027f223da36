"""mHC mixing coefficients (twin: `dsv4.ops.hc_split_sinkhorn_torch`): sigmoid pre/post gates and the
Sinkhorn projection of the n×n stream-mixing matrix, all iterations in registers in one launch (the
PyTorch form launches ~4 small kernels per iteration). One program handles BLOCK tokens; the n×n
matrices are held as [BLOCK, n, n] (n a power of two).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET


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
        _sinkhorn_kernel[(triton.cdiv(T, block),)](mix, scale.float().contiguous(), base.float().contiguous(),
                                                   pre, post, comb, T, eps, ITERS=iters, NS=n, BLOCK=block)
    return pre.view(*lead, n), post.view(*lead, n), comb.view(*lead, n, n)


@triton.jit
def _hc_mix_kernel(H, FN, SS, MIX, N_TOK, D, K_PER,
                   NS: tl.constexpr, NP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """hc_pre, part 1, for BLOCK_T tokens and one slice [K_PER·split, K_PER·(split+1)) of the N·D stream
    values: Σ h² and the (2+N)·N mix logits h · fnᵀ as one fp32 dot against fn read as NP rows (zeros
    past its (2+N)·N; below 16 tokens, products summed over the block instead of a dot),
    stored as partial sums per slice (a slice per program keeps the GPU busy when there are few
    tokens, as in a decode step)."""
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
        hv = tl.load(hrow + kk[None, :], mask=tm[:, None] & km[None, :], other=0.0).to(tl.float32)   # [BT, BK]
        ss += tl.sum(hv * hv, 1)
        f = tl.load(FN + r[None, :].to(tl.int64) * ND + kk[:, None],
                    mask=km[:, None] & (r < (2 + NS) * NS)[None, :], other=0.0)                        # [BK, NP]
        if BLOCK_T >= 16:
            acc += tl.dot(hv, f, input_precision="ieee")
        else:                          # a decode step's few tokens: products and a sum over the block
            acc += tl.sum(hv[:, :, None] * f[None, :, :], 1)
    base = (sp * N_TOK + t).to(tl.int64)
    tl.store(SS + base, ss, mask=tm)
    tl.store(MIX + base[:, None] * NP + r[None, :], acc, mask=tm[:, None])


@triton.jit
def _hc_finish_kernel(H, SS, MIX, SCALE, BASE, X, POST, COMB, N_TOK, D, NSPLIT, eps, norm_eps,
                      ITERS: tl.constexpr, NS: tl.constexpr, NP: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_D: tl.constexpr, SPLIT_BLOCK: tl.constexpr):
    """hc_pre, part 2: the slices' sums, RMS scaling, gates, Sinkhorn, then x = Σ_j pre_j h_j."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
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
        cc += tl.sum(tl.load(MIX + base[:, :, None] * NP + 2 * NS + rc[None, None, :], mask=m2[:, :, None],
                             other=0.0), 0)
    rho = 1.0 / tl.sqrt(ss / ND + norm_eps)
    s0 = tl.load(SCALE)
    s1 = tl.load(SCALE + 1)
    s2 = tl.load(SCALE + 2)
    i = tl.arange(0, NS)
    pp3 = tl.reshape(pp * rho[:, None], [BLOCK_T, 2, NS])
    half = tl.arange(0, 2)[None, :, None]
    pre_l = tl.sum(tl.where(half == 0, pp3, 0.0), 1)                                 # [BT, N]
    post_l = tl.sum(tl.where(half == 1, pp3, 0.0), 1)
    pre = tl.sigmoid(pre_l * s0 + tl.load(BASE + i)[None, :]) + eps
    post = 2 * tl.sigmoid(post_l * s1 + tl.load(BASE + NS + i)[None, :])
    tl.store(POST + t[:, None] * NS + i[None, :], post, mask=tm[:, None])
    jk = i[:, None] * NS + i[None, :]
    c = tl.reshape(cc * rho[:, None], [BLOCK_T, NS, NS]) * s2 + tl.load(BASE + 2 * NS + jk)[None, :, :]
    c = _sinkhorn(c, eps, ITERS)
    tl.store(COMB + t.to(tl.int64)[:, None, None] * (NS * NS) + jk[None, :, :], c, mask=tm[:, None, None])
    dd = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        dm = (d0 + dd) < D
        off = t.to(tl.int64)[:, None, None] * ND + i[None, :, None] * D + (d0 + dd)[None, None, :]
        hv = tl.load(H + off, mask=tm[:, None, None] & dm[None, None, :], other=0.0).to(tl.float32)  # [BT, N, BD]
        x = tl.sum(pre[:, :, None] * hv, 1)
        tl.store(X + t.to(tl.int64)[:, None] * D + (d0 + dd)[None, :], x.to(X.dtype.element_ty),
                 mask=tm[:, None] & dm[None, :])


def hc_pre(h, fn, scale, base, n, iters, eps, norm_eps, block_t: int | None = None, block_k: int | None = None,
           programs: int | None = None, finish_block_t: int | None = None):
    """x [.., D] (h's dtype), post [.., N], comb [.., N, N] fp32 from streams h [.., N, D]. The mix GEMV is
    split over enough slices of N·D to give ~`programs` programs (one slice when tokens are many).
    Under the interpreter the defaults are few large programs (its cost is per program and per op).
    On sm90 (`bench/ptxas_report.py`): the mix at 16 tokens uses 138 registers, the finish at 8 tokens 168, no spills
    (the finish at 16 × 128 spills). Below 16 tokens (decode) the mix is a GEMV over one block of N·D
    per program (128 values: 0.070 ms vs 0.155 at 64 for one token on the H200, `bench_kernels --only
    hc`), as many programs as blocks up to `programs`; the finish reads the slices' partial sums in
    groups (a serial loop over V4-Flash's 128 slices took 47 µs)."""
    block_t = block_t or (128 if INTERPRET else 32)
    finish_block_t = finish_block_t or (128 if INTERPRET else 8)
    programs = programs or (1 if INTERPRET else 264)
    if n & (n - 1):
        raise ValueError(f"mHC kernel: hc_mult {n} must be a power of two")
    lead, D = h.shape[:-2], h.shape[-1]
    hv = h.reshape(-1, n, D).contiguous()
    T = hv.shape[0]
    x = torch.empty(T, D, device=h.device, dtype=h.dtype)
    post = torch.empty(T, n, device=h.device, dtype=torch.float32)
    comb = torch.empty(T, n, n, device=h.device, dtype=torch.float32)
    if T:
        nd = n * D
        if T < 16:
            block_k = block_k or 128
            block_t = triton.next_power_of_2(T)
            split = max(1, min(programs, triton.cdiv(nd, block_k)))
        else:
            block_k = block_k or 64
            block_t = min(block_t, max(16, triton.next_power_of_2(T)))
            split = max(1, min(triton.cdiv(programs, triton.cdiv(T, block_t)), triton.cdiv(nd, 4 * block_k)))
        tb = triton.cdiv(T, block_t)
        k_per = triton.cdiv(triton.cdiv(nd, split), block_k) * block_k
        split = triton.cdiv(nd, k_per)
        n_pad = max(16, triton.next_power_of_2((2 + n) * n))
        ss = torch.empty(split, T, device=h.device, dtype=torch.float32)
        mix = torch.empty(split, T, n_pad, device=h.device, dtype=torch.float32)
        _hc_mix_kernel[(tb, split)](hv, fn.float().contiguous(), ss, mix, T, D, k_per, NS=n, NP=n_pad,
                                    BLOCK_T=block_t, BLOCK_K=block_k)
        finish_block_t = min(finish_block_t, triton.next_power_of_2(T))
        _hc_finish_kernel[(triton.cdiv(T, finish_block_t),)](
            hv, ss, mix, scale.float().contiguous(), base.float().contiguous(), x, post, comb, T, D, split, eps,
            norm_eps, ITERS=iters, NS=n, NP=n_pad, BLOCK_T=finish_block_t,
            BLOCK_D=min(max(128, 1024 // finish_block_t), triton.next_power_of_2(D)),
            SPLIT_BLOCK=min(64 // finish_block_t if finish_block_t < 64 else 1, triton.next_power_of_2(split)))
    return x.view(*lead, D), post.view(*lead, n), comb.view(*lead, n, n)


@triton.jit
def _hc_post_kernel(F, H, POST, COMB, OUT, N_TOK, D, NS: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """out[t, k] = post[t, k] · f[t] + Σ_j comb[t, j, k] · h[t, j] in fp32, for BLOCK_T × BLOCK_D."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tm = t < N_TOK
    dm = d < D
    i = tl.arange(0, NS)
    t64 = t.to(tl.int64)
    m3 = tm[:, None, None] & dm[None, None, :]
    hv = tl.load(H + t64[:, None, None] * (NS * D) + i[None, :, None] * D + d[None, None, :], mask=m3,
                 other=0.0).to(tl.float32)                                             # [BT, N(j), BD]
    fv = tl.load(F + t64[:, None] * D + d[None, :], mask=tm[:, None] & dm[None, :], other=0.0).to(tl.float32)
    post = tl.load(POST + t64[:, None] * NS + i[None, :], mask=tm[:, None], other=0.0)       # [BT, N]
    comb = tl.load(COMB + t64[:, None, None] * (NS * NS) + i[None, :, None] * NS + i[None, None, :],
                   mask=tm[:, None, None], other=0.0)                                  # [BT, N(j), N(k)]
    mixed = tl.sum(comb[:, :, :, None] * hv[:, :, None, :], 1)                          # [BT, N(k), BD]
    out = post[:, :, None] * fv[:, None, :] + mixed
    tl.store(OUT + t64[:, None, None] * (NS * D) + i[None, :, None] * D + d[None, None, :],
             out.to(OUT.dtype.element_ty), mask=m3)


def hc_post(f, residual, post, comb, block_t: int | None = None, block_d: int = 128):
    """[.., N, D] in residual's dtype: post_k · f + Σ_j comb[j, k] · h_j (fp32 arithmetic)."""
    block_t = block_t or (64 if INTERPRET else 4)
    n, D = residual.shape[-2:]
    if n & (n - 1):
        raise ValueError(f"mHC kernel: hc_mult {n} must be a power of two")
    hv = residual.reshape(-1, n, D).contiguous()
    T = hv.shape[0]
    out = torch.empty_like(hv)
    if T:
        bd = min(block_d, triton.next_power_of_2(D))
        _hc_post_kernel[(triton.cdiv(T, block_t), triton.cdiv(D, bd))](
            f.reshape(T, D).contiguous(), hv, post.reshape(T, n).float().contiguous(),
            comb.reshape(T, n, n).float().contiguous(), out, T, D, NS=n, BLOCK_T=block_t, BLOCK_D=bd)
    return out.view(residual.shape)


@triton.jit
def _norm_step(c, j, eps):
    """Normalisation step j ≥ 1 of the Sinkhorn sequence: j = 1 and odd j divide by column sums, even j by
    row sums (comb [BLOCK, N, N], sums over axis 1 = columns, axis 2 = rows)."""
    if j % 2 == 1:
        c = c / (tl.sum(c, 1)[:, None, :] + eps)
    else:
        c = c / (tl.sum(c, 2)[:, :, None] + eps)
    return c


@triton.jit
def _sinkhorn_bwd_kernel(MIX, SCALE, BASE, DPRE, DPOST, DCOMB, DMIX, DSB, N_TOK, eps,
                         ITERS: tl.constexpr, NS: tl.constexpr, BLOCK: tl.constexpr):
    """Gradient of `split_sinkhorn` for BLOCK tokens. The 2·ITERS − 1 normalisation steps are replayed
    from the softmax for each step's input (ITERS² cheap in-register steps, no stored history).
    DSB [grid, 3 + (2+N)·N]: this block's partial sums for d scale and d base."""
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
    grid = triton.cdiv(T, block)
    dsb = z((max(grid, 1), 3 + width))
    if T:
        _sinkhorn_bwd_kernel[(grid,)](mix, scale.float().contiguous(), base.float().contiguous(), dpre, dpost, dcomb,
                                      dmix, dsb, T, eps, ITERS=iters, NS=n, BLOCK=block)
    sums = dsb.sum(0)
    return dmix.view(*lead, width), sums[:3], sums[3:]
