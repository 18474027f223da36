"""Model FLOPs of a training step (multiply-add = 2; backward = 2× forward), for throughput and MFU.

    F = 6·N_active + 3·Σ_layers A_layer + Σ_CSA I_layer   [+ the MTP block's 6·N + 3·A with mtp=True]

N_active: parameters a token multiplies (`ModelConfig.param_counts()["active"]`: attention, router,
top-K + shared experts, mHC mixing matrices, LM head; not the embedding lookup). A_layer: attention
score + value FLOPs of a query averaged over positions 0..S-1, 4·H·Dh·n_keys(t) with n_keys = min(W, t+1)
+ {0 (SWA); min(top-k, ⌊(t+1)/4⌋) (CSA); ⌊(t+1)/m⌋ (HCA)}. I_layer: lightning-indexer scores,
2·Hi·Di·⌊(t+1)/4⌋, forward only. Pooling, norms, Sinkhorn, softmax and masked keys are not counted:
MFU is useful work over the peak.
"""
from __future__ import annotations

from dsv4.config import ModelConfig


def attention_flops(cfg: ModelConfig, layer: int, S: int) -> tuple[float, float]:
    """(attention, indexer) forward FLOPs per query of `layer`, averaged over positions 0..S-1."""
    ratio, W = cfg.layer_ratio(layer), cfg.sliding_window
    H, Dh = cfg.num_attention_heads, cfg.head_dim
    attn = idx = 0.0
    for t in range(S):
        keys = min(W, t + 1)
        if ratio == 4:
            visible = (t + 1) // 4
            keys += min(cfg.index_topk, visible)
            idx += 2 * cfg.index_n_heads * cfg.index_head_dim * visible
        elif ratio:
            keys += (t + 1) // ratio
        attn += 4 * H * Dh * keys
    return attn / S, idx / S


def train_flops_per_token(cfg: ModelConfig, S: int, mtp: bool = False) -> dict[str, float]:
    counts = cfg.param_counts()
    n_active = counts["active"]
    layers = list(range(cfg.num_hidden_layers))
    if mtp:
        layers += [cfg.num_hidden_layers + k for k in range(cfg.num_nextn_predict_layers)]
        E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
        expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
        n_active += counts["mtp"] - (E - K) * expert + cfg.hidden_size * cfg.vocab_size  # + the shared head again
    attn = idx = 0.0
    for i in layers:
        a, x = attention_flops(cfg, i, S)
        attn, idx = attn + a, idx + x
    total = 6 * n_active + 3 * attn + idx
    return {"matmul": 6 * n_active, "attention": 3 * attn, "indexer": idx, "total": total,
            "active_params": n_active}
