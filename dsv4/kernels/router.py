"""The router after its logits GEMM, one program per token (twin: `dsv4.ops.route_torch`): affinities
(sqrt-softplus, sigmoid or softmax of the logits), the top-k experts of affinity + bias (or the token's
hash row), their affinities normalised over the k and scaled. In PyTorch this is ~8 launches per layer
(softplus, sqrt, add, top-k and its gather, gather, sum, divide, scale); a decode step has one per MoE
layer, so they cost more than the arithmetic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from . import INTERPRET
from .launch import launchable, next_pow2, pdl, pdl_start


@launchable
@triton.jit
def _route_kernel(LOGITS, BIAS, IDS, HASH, W_OUT, IDX_OUT, S_OUT, E, s_l, s_h, route_scale,
                  K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, FUNC: tl.constexpr,
                  NORM: tl.constexpr, HASHED: tl.constexpr, PRECISE: tl.constexpr, PDL: tl.constexpr = False):
    pdl_start(PDL)
    n = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    e_ok = e < E
    x = tl.load(LOGITS + n * s_l + e, mask=e_ok, other=0.0).to(tl.float32)
    if FUNC == 0 and PRECISE:   # sqrt(softplus(x)) with the CUDA math library's exp, log1p and sqrt, as
        # PyTorch computes it (x above 20: x): the same affinities bit for bit, so the same experts
        s = libdevice.sqrt_rn(tl.where(x > 20.0, x, libdevice.log1p(libdevice.exp(tl.minimum(x, 20.0)))))
    elif FUNC == 0:    # (the interpreter has no libdevice) softplus = max(x, 0) + log1p(exp(−|x|)) with
        y = tl.exp(-tl.abs(x))    # log1p(y) = log(u)·y / (u − 1), u = 1 + y rounded (y where u rounds to 1)
        u = 1.0 + y
        sp = tl.maximum(x, 0.0) + tl.where(u == 1.0, y, tl.log(u) * y / tl.where(u == 1.0, 1.0, u - 1.0))
        s = tl.sqrt(sp)
    elif FUNC == 1 and PRECISE:
        s = libdevice.div_rn(1.0, 1.0 + libdevice.exp(-x))
    elif FUNC == 1:    # sigmoid
        s = 1.0 / (1.0 + tl.exp(-x))
    else:              # softmax over the experts
        z = tl.where(e_ok, x, float("-inf"))
        p = tl.exp(z - tl.max(z, 0))
        s = p / tl.sum(p, 0)
    tl.store(S_OUT + n * E + e, s, mask=e_ok)
    kk = tl.arange(0, BLOCK_K)
    if HASHED:
        idx = tl.load(HASH + tl.load(IDS + n) * s_h + kk, mask=kk < K, other=0)
        w = tl.sum(tl.where(e[None, :] == idx[:, None], s[None, :], 0.0), 1)          # [BLOCK_K]
    else:
        sel = tl.where(e_ok, s + tl.load(BIAS + e, mask=e_ok, other=0.0), float("-inf"))
        idx = tl.zeros((BLOCK_K,), tl.int64)
        w = tl.zeros((BLOCK_K,), tl.float32)
        for i in tl.static_range(K):       # the largest remaining, lowest index among equals
            m = tl.max(sel, 0)
            j = tl.min(tl.where(sel == m, e, BLOCK_E), 0)
            idx = tl.where(kk == i, j, idx)
            w = tl.where(kk == i, tl.sum(tl.where(e == j, s, 0.0), 0), w)
            sel = tl.where(e == j, float("-inf"), sel)
    w = tl.where(kk < K, w, 0.0)
    if NORM:
        w = w / tl.sum(w, 0)
    tl.store(W_OUT + n * K + kk, w * route_scale, mask=kk < K)
    tl.store(IDX_OUT + n * K + kk, idx, mask=kk < K)


FUNCS = {"sqrtsoftplus": 0, "sigmoid": 1, "softmax": 2}


def route(logits: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor | None, hash_table: torch.Tensor | None,
          topk: int, score_func: str, norm_topk: bool, route_scale: float):
    """logits [N, E] fp32; bias [E] (top-k routing) or ids [N] and hash_table [V, K] (hash routing)
    -> weights [N, K] fp32, indices [N, K] int64, affinities [N, E] fp32."""
    N, E = logits.shape
    hashed = hash_table is not None
    if score_func not in FUNCS or (not hashed and bias is None) or topk > E:
        raise ValueError(f"router kernel: score function {score_func!r} (one of {', '.join(FUNCS)}), a bias or a "
                         f"hash table, and top-k {topk} <= {E} experts needed")
    logits = logits.float()
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    dev = logits.device
    w = torch.empty(N, topk, dtype=torch.float32, device=dev)
    idx = torch.empty(N, topk, dtype=torch.int64, device=dev)
    scores = torch.empty(N, E, dtype=torch.float32, device=dev)
    if N:
        dummy = logits
        ht = hash_table.contiguous() if hashed else dummy
        _route_kernel[(N,)](logits, bias.float().contiguous() if not hashed else dummy,
                            ids.contiguous() if hashed else dummy, ht, w, idx, scores, E, logits.stride(0),
                            ht.stride(0) if hashed else 0, float(route_scale), K=topk,
                            BLOCK_E=next_pow2(E), BLOCK_K=next_pow2(topk),
                            FUNC=FUNCS[score_func], NORM=norm_topk, HASHED=hashed, PRECISE=not INTERPRET,
                            num_warps=1 if E <= 256 else 2, **pdl(logits))
    return w, idx, scores
