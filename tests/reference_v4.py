"""An independent float64 re-derivation of the DeepSeek-V4 forward pass, used as a test oracle.

Written from ARCHITECTURE.md §3–§10 and the §19 checklist only (it shares nothing with the
package's model code except the config dataclass): float64 throughout, no quantisation
simulation, and explicit per-query / per-entry loops wherever a loop makes the formula obvious.
It is slow on purpose; sequences of a few hundred tokens at tiny sizes take seconds.

Shapes: B batch, S tokens, D hidden, N mHC streams, H heads, Dh head dim, Dr rope dims,
Hi / Di indexer heads / head dim, m compression ratio, E experts, K experts per token, V vocab.

Public entry points:
  reference_forward(sd, cfg, input_ids, return_hidden=False) -> logits [B,S,V] (, hidden [B,S,N,D])
  reference_mtp(sd, cfg, hidden, next_ids) -> logits [B,S,V]
`sd` is a state dict with the package's key names (official checkpoint names). `variant` switches
let a test build a deliberately different model (e.g. transformers' choices) to show a test can
fail; `stats` (a dict) collects how often the SwiGLU clamps fire.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from dsv4.config import ModelConfig

F64 = torch.float64


@dataclass(frozen=True)
class Variant:
    """Alternative formula choices, for tests that must be able to fail. Defaults = the spec."""
    weight_after_w2: bool = False   # transformers multiplies the routing weight after W2 (§8.4, §14.5)
    shared_clamp: bool = True       # the first official release did not clamp the shared expert (§8.5)


SPEC = Variant()


# ----------------------------------------------------------------------------- basic pieces (§10)
def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """y = w ⊙ x / sqrt(mean(x²) + eps) over the last dim; weight None = unweighted."""
    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x · wᵀ, no bias anywhere in the model (§10)."""
    return x @ w.T


# ----------------------------------------------------------------------------- RoPE / YaRN (§5.2)
def rope_frequencies(cfg: ModelConfig, ratio: int) -> torch.Tensor:
    """Per-pair angular frequencies f'_i (i = 0..Dr/2-1) of a layer with compression ratio `ratio`.

    Ratio 0: θ = rope_theta, plain. Ratio > 0: θ = compress_rope_theta with YaRN always applied.
    """
    Dr = cfg.qk_rope_head_dim
    theta = cfg.rope_theta if ratio == 0 else cfg.compress_rope_theta
    freqs = [theta ** (-2.0 * i / Dr) for i in range(Dr // 2)]
    yarn = cfg.rope_scaling
    if ratio > 0 and yarn and yarn.get("type", yarn.get("rope_type")) == "yarn":
        L0, factor = yarn["original_max_position_embeddings"], yarn["factor"]

        def corr(n_rot: float) -> float:
            return Dr * math.log(L0 / (2 * math.pi * n_rot)) / (2 * math.log(theta))

        low = max(math.floor(corr(yarn["beta_fast"])), 0)
        high = min(math.ceil(corr(yarn["beta_slow"])), Dr - 1)
        if high == low:  # degenerate ramp: avoid 0/0 (a step at `low`)
            high = low + 0.001
        for i in range(Dr // 2):
            ramp = min(max((i - low) / (high - low), 0.0), 1.0)
            freqs[i] = freqs[i] * ((1 - ramp) + ramp / factor)
    return torch.tensor(freqs, dtype=F64)


def rotate(v: torch.Tensor, position: float, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate the LAST 2·len(freqs) dims of v (any leading dims) by angle position·f_i.

    Interleaved pairs: dims (base+2i, base+2i+1) are the complex number a + ib, times exp(i·pos·f_i).
    A negative position de-rotates (the conjugate).
    """
    Dr = 2 * len(freqs)
    out = v.clone()
    base = v.shape[-1] - Dr
    for i in range(len(freqs)):
        angle = position * float(freqs[i])
        c, s = math.cos(angle), math.sin(angle)
        a, b = v[..., base + 2 * i], v[..., base + 2 * i + 1]
        out[..., base + 2 * i] = a * c - b * s
        out[..., base + 2 * i + 1] = a * s + b * c
    return out


# ----------------------------------------------------------------------------- mHC (§4)
def hc_pre(h: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, cfg: ModelConfig):
    """One token's streams h [N, D] -> (x [D], post [N], comb [N, N]) per §4.1."""
    N = cfg.hc_mult
    eps = cfg.hc_eps
    v = h.reshape(-1)                                               # stream-major [N·D]
    rho = 1.0 / math.sqrt(float((v * v).mean()) + cfg.rms_norm_eps)
    mu = (fn @ v) * rho                                             # [(2+N)·N]
    pre = torch.sigmoid(mu[:N] * scale[0] + base[:N]) + eps
    post = 2 * torch.sigmoid(mu[N:2 * N] * scale[1] + base[N:2 * N])
    C = (mu[2 * N:] * scale[2] + base[2 * N:]).reshape(N, N)       # C[j, k], row j
    C = torch.softmax(C, dim=1) + eps                               # softmax over k in each row
    C = C / (C.sum(dim=0, keepdim=True) + eps)                      # column normalisation
    for _ in range(cfg.hc_sinkhorn_iters - 1):
        C = C / (C.sum(dim=1, keepdim=True) + eps)                  # rows
        C = C / (C.sum(dim=0, keepdim=True) + eps)                  # columns (last op)
    x = sum(pre[j] * h[j] for j in range(N))
    return x, post, C


def hc_post(f: torch.Tensor, h: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """h'_k = post_k · f + Σ_j comb[j, k] · h_j  (comb[j, k] routes input j to output k, §4.2)."""
    N = h.shape[0]
    return torch.stack([post[k] * f + sum(comb[j, k] * h[j] for j in range(N)) for k in range(N)])


def hc_head(h: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, cfg: ModelConfig):
    """One token's streams [N, D] -> [D]: σ-weighted sum, no Sinkhorn, no post (§4.3)."""
    v = h.reshape(-1)
    rho = 1.0 / math.sqrt(float((v * v).mean()) + cfg.rms_norm_eps)
    pre = torch.sigmoid((fn @ v) * rho * scale[0] + base) + cfg.hc_eps
    return sum(pre[j] * h[j] for j in range(cfg.hc_mult))


# ----------------------------------------------------------------------------- compressor (§6)
def compress(x: torch.Tensor, p: dict, prefix: str, m: int, c: int, freqs: torch.Tensor,
             cfg: ModelConfig) -> torch.Tensor:
    """Compressed entries [S // m, c] of one sequence x [S, D]: pooled, weighted-normed, roped at i·m.

    Overlapping (m == 4): entry i pools 2m slots per channel — tokens of window i-1 through feature
    half [0:c) and tokens of window i through half [c:2c); entry 0's borrowed slots have weight 0.
    Otherwise entry i pools the m tokens of window i. Softmax over slots per channel, `ape` added to
    the gate scores by position within the window.
    """
    overlap = m == 4
    S = x.shape[0]
    P = linear(x, p[prefix + "wkv.weight"])                        # [S, (1+o)·c]
    Z = linear(x, p[prefix + "wgate.weight"])                      # [S, (1+o)·c]
    ape = p[prefix + "ape"]                                          # [m, (1+o)·c]
    Z = torch.stack([Z[t] + ape[t % m] for t in range(S)])
    entries = []
    for i in range(S // m):
        vals, gates = [], []
        if overlap:
            for j in range(m):                                       # previous window, half [0:c)
                t = (i - 1) * m + j
                if i == 0:
                    vals.append(torch.zeros(c, dtype=F64))
                    gates.append(torch.full((c,), -math.inf, dtype=F64))
                else:
                    vals.append(P[t, :c])
                    gates.append(Z[t, :c])
            for j in range(m):                                       # own window, half [c:2c)
                vals.append(P[i * m + j, c:])
                gates.append(Z[i * m + j, c:])
        else:
            for j in range(m):
                vals.append(P[i * m + j])
                gates.append(Z[i * m + j])
        weights = torch.softmax(torch.stack(gates), dim=0)           # [slots, c], per channel
        E = (weights * torch.stack(vals)).sum(0)                     # [c]
        E = rms_norm(E, p[prefix + "norm.weight"], cfg.rms_norm_eps)
        entries.append(rotate(E, i * m, freqs))
    return torch.stack(entries) if entries else torch.zeros(0, c, dtype=F64)


# ----------------------------------------------------------------------------- attention (§5, §7)
def attention(x: torch.Tensor, p: dict, ratio: int, cfg: ModelConfig) -> torch.Tensor:
    """One sequence x [S, D] (attn_norm output) -> [S, D]."""
    S = x.shape[0]
    H, Dh, eps = cfg.num_attention_heads, cfg.head_dim, cfg.rms_norm_eps
    freqs = rope_frequencies(cfg, ratio)

    cq = rms_norm(linear(x, p["wq_a.weight"]), p["q_norm.weight"], eps)           # [S, q_lora]
    q = linear(cq, p["wq_b.weight"]).reshape(S, H, Dh)
    q = rms_norm(q, None, eps)                                                     # per head, unweighted
    q = torch.stack([rotate(q[t], t, freqs) for t in range(S)])                    # [S, H, Dh]
    kv = rms_norm(linear(x, p["wkv.weight"]), p["kv_norm.weight"], eps)            # [S, Dh], K = V
    kv = torch.stack([rotate(kv[t], t, freqs) for t in range(S)])

    comp = compress(x, p, "compressor.", ratio, Dh, freqs, cfg) if ratio else None  # [S//m, Dh]
    if ratio == 4:
        Hi, Di = cfg.index_n_heads, cfg.index_head_dim
        qi = linear(cq, p["indexer.wq_b.weight"]).reshape(S, Hi, Di)
        qi = torch.stack([rotate(qi[t], t, freqs) for t in range(S)])              # [S, Hi, Di]
        ki = compress(x, p, "indexer.compressor.", 4, Di, freqs, cfg)              # [S//4, Di]
        wi = linear(x, p["indexer.weights_proj.weight"]) * Di ** -0.5 * Hi ** -0.5  # [S, Hi]

    sink = p["attn_sink"]                                                          # [H]
    outs = []
    for t in range(S):
        keys = [kv[s] for s in range(max(0, t - cfg.sliding_window + 1), t + 1)]
        if ratio:
            visible = (t + 1) // ratio
            if ratio == 4:
                # I[t, s] = Σ_h w[t, h] · ReLU(q^I[t, h] · K^I[s])  for the visible s
                scores = (wi[t][:, None] * torch.relu(qi[t] @ ki[:visible].T)).sum(0)   # [visible]
                order = sorted(range(visible), key=lambda s: -float(scores[s]))
                chosen = order[:cfg.index_topk]
            else:
                chosen = range(visible)
            keys += [comp[s] for s in chosen]
        K = torch.stack(keys)                                                      # [n, Dh]
        z = (q[t] @ K.T) / math.sqrt(Dh)                                           # [H, n]
        top = torch.maximum(z.max(dim=1).values, sink)                             # stabiliser
        e = torch.exp(z - top[:, None])
        o = (e @ K) / (e.sum(1) + torch.exp(sink - top))[:, None]                  # [H, Dh]
        o = rotate(o, -t, freqs)                                                   # de-rotate rope dims
        outs.append(o.reshape(-1))
    o = torch.stack(outs)                                                          # [S, H·Dh]

    G = cfg.o_groups
    wo_a = p["wo_a.weight"].reshape(G, cfg.o_lora_rank, H * Dh // G)
    og = o.reshape(S, G, H * Dh // G)
    u = torch.stack([og[:, g] @ wo_a[g].T for g in range(G)], dim=1).reshape(S, -1)  # [S, G·d_g]
    return linear(u, p["wo_b.weight"])


# ----------------------------------------------------------------------------- MoE (§8)
def swiglu(x: torch.Tensor, w1, w3, w2, weight: float, limit: float, clamp: bool, after_w2: bool,
           stats: dict | None, tag: str) -> torch.Tensor:
    g = w1 @ x                                                     # gate
    u = w3 @ x                                                     # up
    if clamp and limit > 0:
        if stats is not None:
            stats[tag + "_up"] = stats.get(tag + "_up", 0) + int((u.abs() > limit).sum())
            stats[tag + "_gate"] = stats.get(tag + "_gate", 0) + int((g > limit).sum())
        u = u.clamp(-limit, limit)
        g = g.clamp(max=limit)
    h = torch.nn.functional.silu(g) * u
    if after_w2:
        return (w2 @ h) * weight
    return w2 @ (h * weight)


def moe(x: torch.Tensor, ids: torch.Tensor, p: dict, hashed: bool, cfg: ModelConfig,
        variant: Variant, stats: dict | None) -> torch.Tensor:
    """One sequence x [S, D] (ffn_norm output), token ids [S] -> [S, D]."""
    assert cfg.scoring_func == "sqrtsoftplus" and cfg.norm_topk_prob
    limit = cfg.swiglu_limit
    out = []
    for t in range(x.shape[0]):
        s = torch.sqrt(torch.nn.functional.softplus(p["gate.weight"] @ x[t]))      # [E] affinities
        if hashed:
            idx = [int(e) for e in p["gate.tid2eid"][int(ids[t])]]
        else:
            biased = s + p["gate.bias"]
            idx = sorted(range(len(s)), key=lambda e: -float(biased[e]))[:cfg.num_experts_per_tok]
        total = sum(s[e] for e in idx)
        y = torch.zeros_like(x[t])
        for e in idx:
            w = s[e] / total * cfg.routed_scaling_factor
            y = y + swiglu(x[t], p["experts.w1"][e], p["experts.w3"][e], p["experts.w2"][e], w, limit,
                           True, variant.weight_after_w2, stats, "routed")
        if cfg.n_shared_experts:
            y = y + swiglu(x[t], p["shared_experts.w1.weight"], p["shared_experts.w3.weight"],
                           p["shared_experts.w2.weight"], 1.0, limit, variant.shared_clamp, False, stats,
                           "shared")
        out.append(y)
    return torch.stack(out)


# ----------------------------------------------------------------------------- block (§3.1)
def sub(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def block(h: torch.Tensor, ids: torch.Tensor, p: dict, ratio: int, hashed: bool, cfg: ModelConfig,
          variant: Variant, stats: dict | None) -> torch.Tensor:
    """One sequence's streams h [S, N, D] through one block (attention site, then FFN site)."""
    S = h.shape[0]
    eps = cfg.rms_norm_eps
    for site in ("attn", "ffn"):
        mixes = [hc_pre(h[t], p[f"hc_{site}_fn"], p[f"hc_{site}_base"], p[f"hc_{site}_scale"], cfg)
                 for t in range(S)]
        x = torch.stack([mx[0] for mx in mixes])                                   # [S, D]
        x = rms_norm(x, p[f"{site}_norm.weight"], eps)
        if site == "attn":
            f = attention(x, sub(p, "attn."), ratio, cfg)
        else:
            f = moe(x, ids, sub(p, "ffn."), hashed, cfg, variant, stats)
        h = torch.stack([hc_post(f[t], h[t], mixes[t][1], mixes[t][2]) for t in range(S)])
    return h


def head(h: torch.Tensor, sd: dict, prefix: str, cfg: ModelConfig) -> torch.Tensor:
    """Streams [S, N, D] -> logits [S, V]: hc_head (of `prefix`), final norm, shared LM head."""
    y = torch.stack([hc_head(h[t], sd[prefix + "hc_head_fn"], sd[prefix + "hc_head_base"],
                             sd[prefix + "hc_head_scale"], cfg) for t in range(h.shape[0])])
    y = rms_norm(y, sd[prefix + "norm.weight"], cfg.rms_norm_eps)
    return linear(y, sd["head.weight"])


@contextlib.contextmanager
def one_thread():
    """The reference runs thousands of tiny ops; intra-op threads only add latency (badly so on a
    loaded machine), so it runs single-threaded and restores the caller's setting."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _f64(sd: dict) -> dict:
    return {k: (v.detach().to(F64) if v.is_floating_point() else v.detach()) for k, v in sd.items()}


# ----------------------------------------------------------------------------- public entry points
def reference_forward(sd: dict, cfg: ModelConfig, input_ids: torch.Tensor, *, return_hidden: bool = False,
                      variant: Variant = SPEC, stats: dict | None = None):
    """Logits [B, S, V] of the main model (§3); with return_hidden also the last block's streams
    [B, S, N, D] (before hc_head), which is what the MTP block consumes."""
    with one_thread(), torch.no_grad():
        return _forward(_f64(sd), cfg, input_ids, return_hidden, variant, stats)


def _forward(sd, cfg, input_ids, return_hidden, variant, stats):
    N = cfg.hc_mult
    logits, hidden = [], []
    for b in range(input_ids.shape[0]):
        ids = input_ids[b]
        e = sd["embed.weight"][ids]                                                # [S, D]
        h = e[:, None, :].repeat(1, N, 1)                                          # [S, N, D] copies
        for layer in range(cfg.num_hidden_layers):
            h = block(h, ids, sub(sd, f"layers.{layer}."), cfg.layer_ratio(layer),
                      layer < cfg.num_hash_layers, cfg, variant, stats)
        hidden.append(h)
        logits.append(head(h, sd, "", cfg))
    logits = torch.stack(logits)
    return (logits, torch.stack(hidden)) if return_hidden else logits


def reference_mtp(sd: dict, cfg: ModelConfig, hidden: torch.Tensor, next_ids: torch.Tensor, *, k: int = 0,
                  variant: Variant = SPEC, stats: dict | None = None) -> torch.Tensor:
    """MTP block k (§9): position t gets the main streams h_t and the id of token t+1; returns
    logits [B, S, V] (predicting token t+2)."""
    with one_thread(), torch.no_grad():
        return _mtp(_f64(sd), cfg, hidden, next_ids, k, variant, stats)


def _mtp(sd, cfg, hidden, next_ids, k, variant, stats):
    p = sub(sd, f"mtp.{k}.")
    eps = cfg.rms_norm_eps
    ratio = cfg.layer_ratio(cfg.num_hidden_layers + k)
    hidden = hidden.to(F64)
    logits = []
    for b in range(next_ids.shape[0]):
        ids = next_ids[b]
        e = rms_norm(sd["embed.weight"][ids], p["enorm.weight"], eps)              # [S, D]
        z = linear(e, p["e_proj.weight"])[:, None, :] \
            + linear(rms_norm(hidden[b], p["hnorm.weight"], eps), p["h_proj.weight"])  # [S, N, D]
        z = block(z, ids, p, ratio, False, cfg, variant, stats)
        logits.append(head(z, {**p, "head.weight": sd["head.weight"]}, "", cfg))
    return torch.stack(logits)
