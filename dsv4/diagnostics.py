"""Diagnostics of a model's residual streams: the composite gain of the mHC paper.

Hyper-connections carry N residual streams; each mHC site l mixes them with a residual map H_l
(N × N, the paper's H^res_l; here H_l = combᵀ, since `comb[j, k]` routes stream j to stream k,
spec §4.2). Over depth the signal of site l reaches the output through the composite map

    P_l = H_{L−1} · H_{L−2} ⋯ H_l          (L sites: every block counts twice, attention and FFN)

The mHC paper (Xie et al. 2025, arXiv:2512.24880, Figs. 3 and 7) measures how far P_l is from an
identity-like map by its "Amax gain magnitude": the largest absolute row sum (forward signal gain,
‖P‖_∞) and the largest absolute column sum (backward gradient gain, ‖P‖_1), averaged over the tokens
of a sequence. A doubly stochastic H keeps both at 1 (the product of doubly stochastic matrices is
doubly stochastic); the paper reports peaks near 3000 for unconstrained HC and about 1.6 for mHC at
27B. Here the gain is taken per token and then averaged over tokens (the paper's wording, "... column
sum, averaged over all tokens in a selected sequence", allows either order; per token is the
worst-case reading and is what a token's own signal experiences).
"""
from __future__ import annotations

import torch

from dsv4.model import Transformer, hc_post, hc_pre


@torch.no_grad()
def residual_maps(model: Transformer, input_ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The residual map H_l [B, S, N, N] (float64) of every mHC site of the main layers, in depth order
    (layer 0 attention, layer 0 FFN, layer 1 attention, ...), from one full-sequence forward pass.

    Runs the same functions as `Block.forward`; also returns the final streams [B, S, N, D] so that a
    test can check them against `model.blocks`.
    """
    model.check_ids(input_ids)
    B, S = input_ids.shape
    pos = torch.arange(S, device=input_ids.device).expand(B, S)
    h = model.embed(input_ids).unsqueeze(2).expand(-1, -1, model.config.hc_mult, -1).contiguous()
    maps = []
    for layer in model.layers:
        for site in ("attn", "ffn"):
            x, post, comb = hc_pre(h, getattr(layer, f"hc_{site}_fn"), getattr(layer, f"hc_{site}_scale"),
                                   getattr(layer, f"hc_{site}_base"), *layer.hc, layer.hc_mode)
            maps.append(comb.transpose(-1, -2).double())                      # H = combᵀ [B, S, N, N]
            x = (layer.attn(layer.attn_norm(x), pos) if site == "attn" else layer.ffn(layer.ffn_norm(x), input_ids))[0]
            h = hc_post(x, h, post, comb)
    return maps, h


def amax_gains(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(forward, backward) gain of matrices m [..., N, N]: max |row sum| and max |column sum|. -> [...]"""
    return m.sum(-1).abs().amax(-1), m.sum(-2).abs().amax(-1)


def composite_gain(maps: list[torch.Tensor]) -> dict:
    """Single-site and composite Amax gains of residual maps H_l [..., N, N] (token dims first).

    Returns lists over l (one entry per site, token-averaged): `single_forward`, `single_backward`
    (of H_l), `composite_forward`, `composite_backward` (of P_l = H_{L−1}⋯H_l), and their maxima
    `max_single` and `max_composite` (over l and both directions).
    """
    if not maps:
        raise ValueError("composite_gain needs at least one residual map")
    shape = maps[0].shape
    if any(m.shape != shape for m in maps) or len(shape) < 2 or shape[-1] != shape[-2]:
        raise ValueError(f"residual maps must be square and of one shape; got {[tuple(m.shape) for m in maps]}")
    out = {k: [] for k in ("single_forward", "single_backward", "composite_forward", "composite_backward")}
    prod = torch.eye(shape[-1], dtype=torch.float64, device=maps[0].device).expand(shape)
    composite = []
    for h in reversed(maps):                                                  # P_l = P_{l+1} · H_l
        prod = prod @ h.double()
        composite.append(prod)
    for h, p in zip(maps, reversed(composite)):
        for kind, m in (("single", h.double()), ("composite", p)):
            fwd, bwd = amax_gains(m)
            out[f"{kind}_forward"].append(float(fwd.mean()))
            out[f"{kind}_backward"].append(float(bwd.mean()))
    out["max_single"] = max(out["single_forward"] + out["single_backward"])
    out["max_composite"] = max(out["composite_forward"] + out["composite_backward"])
    return out
