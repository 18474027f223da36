"""Plain-PyTorch reference of every primitive that gets (or will get) a GPU kernel.

The model calls these functions only through this module, so a fast implementation can replace
one by assigning a function with the same signature (see `set_backend`). Each reference states the
numeric policy of the official inference code (ARCHITECTURE.md §2, §11): fp32 for mHC, compressor
pooling, routing and SwiGLU; attention scores in fp32.

Shapes: B batch, S query tokens, T key positions, D model dim, H heads, Dh head dim, N streams,
E experts, K experts per token, C compressed entries, Hi/Di indexer heads/head dim.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

BACKEND = "torch"


def fp32_region(fn):
    """Run `fn` with autocast off: the steps the official code computes in fp32 (mHC, routing, SwiGLU,
    pooling, attention scores, LM head) stay fp32 inside a bf16 `torch.autocast` training step."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        dev = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        if torch.is_autocast_enabled(dev):
            with torch.autocast(dev, enabled=False):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)
    return wrapper


def up(x: torch.Tensor) -> torch.Tensor:
    """`x` in at least fp32: the official code computes these steps in fp32; a float64 model (used by
    the tests against a float64 re-derivation of the spec) stays in float64."""
    return x if x.dtype == torch.float64 else x.float()


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def set_backend(name: str) -> None:
    """Choose the implementation of the primitives ('torch' is the only one on CPU)."""
    global BACKEND
    if name != "torch":
        raise ValueError(f"unknown ops backend {name!r}; available: 'torch'")
    BACKEND = name


# ----------------------------------------------------------------------------- mHC
@fp32_region
def hc_split_sinkhorn(mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, n: int,
                      iters: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Turn the (2+n)·n mix logits of each token into pre [.., n], post [.., n], comb [.., n, n].

    Exact order of the official kernel (spec §4.1 step 8): row softmax + eps, one column
    normalisation, then (iters − 1) × (row, column), eps in every denominator. All fp32.
    `comb[j, k]` routes input stream j to output stream k.
    """
    mixes = up(mixes)
    pre_l, post_l, comb_l = mixes.split([n, n, n * n], dim=-1)
    pre = torch.sigmoid(pre_l * scale[0] + base[:n]) + eps                     # [.., n]
    post = 2 * torch.sigmoid(post_l * scale[1] + base[n:2 * n])               # [.., n]
    comb = comb_l.unflatten(-1, (n, n)) * scale[2] + base[2 * n:].view(n, n)   # [.., n, n]
    comb = torch.softmax(comb, dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return pre, post, comb


# ----------------------------------------------------------------------------- compressor
@fp32_region
def compress_pool(kv: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Softmax-gated pooling over the slot axis, independently per channel (spec §6, eqs 9–12, 20–23).

    kv, score: [.., slots, c] fp32 (score already includes the positional bias `ape`; −inf slots
    get zero weight). Returns [.., c] fp32.
    """
    return (kv * torch.softmax(score, dim=-2)).sum(dim=-2)


# ----------------------------------------------------------------------------- attention
@fp32_region
def sink_attention(q: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor, sink: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """Single shared K=V head attention with a per-head sink logit in the denominator (spec §5.1.5).

    q [B, S, H, Dh]; kv [B, T, Dh] (keys and values are the same vectors); bias [B, S, T] additive
    (0 = visible, −inf = not a candidate); sink [H] fp32, not scaled. Scores and softmax in fp32.
    o_h = Σ_j exp(z_hj) k_j / (Σ_j exp(z_hj) + exp(sink_h)). A query with no candidate gives 0.
    """
    scores = torch.einsum("bshd,btd->bsht", up(q), up(kv)) * scale      # [B, S, H, T]
    scores = scores + up(bias).unsqueeze(2)
    sink_l = up(sink).view(1, 1, -1, 1).expand(*scores.shape[:3], 1)        # [B, S, H, 1]
    logits = torch.cat([scores, sink_l], dim=-1)                                 # [B, S, H, T+1]
    probs = torch.softmax(logits, dim=-1)[..., :-1]                              # [B, S, H, T]
    out = torch.einsum("bsht,btd->bshd", probs, up(kv))                     # [B, S, H, Dh]
    return out.to(q.dtype)


@fp32_region
def index_scores(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Lightning-indexer scores I[t, s] = Σ_h w[t, h] · ReLU(q[t, h] · k[s]) (spec §7, eq. 16).

    q [B, S, Hi, Di]; k [B, C, Di]; w [B, S, Hi] (already scaled). fp32. Returns [B, S, C].
    """
    dots = torch.einsum("bshd,bcd->bshc", up(q), up(k))                 # [B, S, Hi, C]
    return torch.einsum("bshc,bsh->bsc", F.relu(dots), up(w))               # [B, S, C]


# ----------------------------------------------------------------------------- MoE
@fp32_region
def swiglu(g: torch.Tensor, u: torch.Tensor, limit: float) -> torch.Tensor:
    """Clamped SwiGLU in fp32 (spec §8.4): up ∈ [−limit, limit], gate ≤ limit (no lower clamp)."""
    g, u = up(g), up(u)
    if limit > 0:
        u = u.clamp(-limit, limit)
        g = g.clamp(max=limit)
    return F.silu(g) * u


def moe_experts(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, w1: torch.Tensor,
                w2: torch.Tensor, w3: torch.Tensor, limit: float) -> torch.Tensor:
    """Routed experts: y_t = Σ_k W2[e_k] · (weight_tk · SwiGLU(W1[e_k] x_t, W3[e_k] x_t)).

    x [N, D]; idx [N, K] expert ids; weight [N, K] fp32; w1, w3 [E, I, D]; w2 [E, D, I].
    As in the official code the routing weight multiplies the SwiGLU output in fp32 before `w2`.
    Tokens are grouped by expert (one matmul per expert that has tokens). A token listing the same
    expert twice gets both contributions.
    """
    N, K = idx.shape
    flat = idx.reshape(-1)                                                       # [N·K]
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w1.shape[0]).tolist()
    token = order // K                                                           # [N·K]
    wts = weight.reshape(-1)[order]                                              # [N·K]
    y = torch.zeros_like(x)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        sel = token[start:start + n]
        xe = x[sel]                                                              # [n, D]
        h = swiglu(xe @ w1[e].t(), xe @ w3[e].t(), limit) * wts[start:start + n, None]
        y.index_add_(0, sel, (h.to(x.dtype) @ w2[e].t()).to(y.dtype))
        start += n
    return y
