"""FLOPs and KV-cache bytes of DeepSeek-V4 models, and of DeepSeek-V3.2 for the report's comparison.

Two uses, both with multiply-add = 2 FLOPs:

* Training FLOPs per token, for throughput and MFU (`train_flops_per_token`; backward = 2× forward):

      F = 6·N_active + 3·Σ_layers A_layer + Σ_CSA I_layer   [+ the MTP block's 6·N + 3·A with mtp=True]

  N_active: parameters a token multiplies (`ModelConfig.param_counts()["active"]`: attention, router,
  top-K + shared experts, mHC mixing matrices, LM head; not the embedding lookup). A_layer: attention
  score + value FLOPs of a query averaged over positions 0..S-1, 4·H·Dh·n_keys(t) with n_keys = min(W, t+1)
  + {0 (SWA); min(top-k, ⌊(t+1)/4⌋) (CSA); ⌊(t+1)/m⌋ (HCA)}. I_layer: lightning-indexer scores,
  2·Hi·Di·⌊(t+1)/4⌋, forward only. Pooling, norms, Sinkhorn, softmax and masked keys are not counted:
  MFU is useful work over the peak.

* Inference FLOPs per token and KV bytes per sequence at any context (`inference_flops`, `kv_bytes`;
  `dsv4 flops`, `dsv4 kv`), broken down by term and by the precision each term runs in, for V4 configs
  and for DeepSeek-V3.2 (`V32Config`: MLA in its absorbed "MQA" form + the DSA lightning indexer, top-k
  2048), so that the report's claims (V4 at 1M tokens: Pro 27% of V3.2's per-token FLOPs and 10% of its
  KV cache, Flash 10% and 7%) can be checked. docs/evidence.md writes the accounting down, shows how each
  convention moves the ratios, and cites the V3.2 sources.

Conventions of the inference count (each one a keyword, none hidden):
  position   "last": the token at position context−1 (a decode step with `context` tokens cached);
             "average": the mean over positions 0..context−1 (prefill cost per token).
  precision  "raw": every FLOP counts 1. "fp8": FP8-equivalent, each FLOP weighted by the FP8 tensor-core
             rate over its own precision's rate: BF16 (and the few FP32 mHC FLOPs) 2, FP8 1, FP4 0.5
             (hardware with native FP4). "fp8-hopper": the same but FP4 1 (H-series GPUs run FP4 weights
             on the FP8 tensor cores, as the official FP4 GEMM does).
  Each term's precision is the one the released models compute it in: FP8 linears (FP8 weights and
  activations); BF16 where the checkpoint keeps BF16 weights (V4 `wo_a` dequantised, compressors, indexer
  head weights, routers, LM head) and the attention core (BF16 operands); FP4 routed experts
  (`expert_dtype` "fp4") and V4 indexer scores (FP4 q and keys); V3.2 indexer scores FP8.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from dsv4.config import ModelConfig

PRECISION_WEIGHTS = {"raw": {"fp32": 1.0, "bf16": 1.0, "fp8": 1.0, "fp4": 1.0},
                     "fp8": {"fp32": 2.0, "bf16": 2.0, "fp8": 1.0, "fp4": 0.5},
                     "fp8-hopper": {"fp32": 2.0, "bf16": 2.0, "fp8": 1.0, "fp4": 1.0}}
POSITIONS = ("last", "average")
KV_FORMATS = ("bf16", "fp8")


# ----------------------------------------------------------------------------- training (MFU)
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
    if cfg.hc_mode == "residual":  # the mixing matrices exist but a plain residual never multiplies them
        N = cfg.hc_mult
        n_active -= len(layers) * 2 * (2 + N) * N * N * cfg.hidden_size
    attn = idx = 0.0
    for i in layers:
        a, x = attention_flops(cfg, i, S)
        attn, idx = attn + a, idx + x
    total = 6 * n_active + 3 * attn + idx
    return {"matmul": 6 * n_active, "attention": 3 * attn, "indexer": idx, "total": total,
            "active_params": n_active}


# ----------------------------------------------------------------------------- DeepSeek-V3.2
@dataclass(frozen=True)
class V32Config:
    """DeepSeek-V3.2 (-Exp), the report's baseline: MLA + DSA lightning indexer + DeepSeekMoE.

    Field names and values are those of its `config.json` (deepseek-ai/DeepSeek-V3.2-Exp,
    `inference/config_671B_v3.2.json` and the Hub config): 61 layers, the first 3 with a dense FFN.
    """
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    num_attention_heads: int = 128
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    n_shared_experts: int = 1
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048
    num_nextn_predict_layers: int = 1

    def __post_init__(self):
        may_be_zero = ("first_k_dense_replace", "num_nextn_predict_layers", "n_shared_experts")
        for f in dataclasses.fields(self):
            v, low = getattr(self, f.name), 0 if f.name in may_be_zero else 1
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"{f.name}: must be an integer >= {low}, got {v!r}")
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ValueError(f"first_k_dense_replace: cannot exceed num_hidden_layers={self.num_hidden_layers}")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError(f"num_experts_per_tok: cannot exceed n_routed_experts={self.n_routed_experts}")

    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> "V32Config":
        """Read a DeepSeek-V3.2 `config.json` (Hub keys; other keys are ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def param_counts(self) -> dict[str, int]:
        """Parameters a token multiplies, per part (no embedding, no norms)."""
        D, H, dq, dc = self.hidden_size, self.num_attention_heads, self.q_lora_rank, self.kv_lora_rank
        dn, dr, dv = self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        attn = D * dq + dq * H * (dn + dr) + D * (dc + dr) + dc * H * (dn + dv) + H * dv * D
        index = dq * self.index_n_heads * self.index_head_dim + D * self.index_head_dim + D * self.index_n_heads
        expert = 3 * D * self.moe_intermediate_size
        moe = D * self.n_routed_experts + (self.num_experts_per_tok + self.n_shared_experts) * expert
        dense = 3 * D * self.intermediate_size
        L, k = self.num_hidden_layers, self.first_k_dense_replace
        return {"attention": L * attn, "indexer": L * index, "ffn": k * dense + (L - k) * moe,
                "head": D * self.vocab_size,
                "active": L * (attn + index) + k * dense + (L - k) * moe + D * self.vocab_size}


REFERENCE_MODELS = {"deepseek-v3.2": V32Config}


# ----------------------------------------------------------------------------- inference FLOPs
def _positions(context: int, position: str) -> np.ndarray:
    """Number of tokens n = t + 1 visible to each counted query (one, or all of 0..context−1)."""
    if context <= 0:
        raise ValueError(f"context must be a positive number of tokens, got {context}")
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
    return np.array([context], dtype=np.float64) if position == "last" else np.arange(1, context + 1, dtype=np.float64)


class FlopCount:
    """Per-token FLOPs by term and precision: `terms[name][precision]` (raw FLOPs)."""

    def __init__(self, model: str, context: int, position: str):
        self.model, self.context, self.position = model, context, position
        self.terms: dict[str, dict[str, float]] = {}

    def add(self, term: str, precision: str, flops: float) -> None:
        if flops:
            bucket = self.terms.setdefault(term, {})
            bucket[precision] = bucket.get(precision, 0.0) + float(flops)

    def term(self, name: str, precision: str = "raw") -> float:
        w = PRECISION_WEIGHTS[precision]
        return sum(w[p] * f for p, f in self.terms.get(name, {}).items())

    def total(self, precision: str = "raw") -> float:
        if precision not in PRECISION_WEIGHTS:
            raise ValueError(f"precision must be one of {tuple(PRECISION_WEIGHTS)}, got {precision!r}")
        return sum(self.term(name, precision) for name in self.terms)

    def to_dict(self, precision: str = "raw") -> dict[str, Any]:
        return {"model": self.model, "context": self.context, "position": self.position, "precision": precision,
                "terms": {n: self.term(n, precision) for n in self.terms},
                "terms_by_precision": {n: dict(v) for n, v in self.terms.items()},
                "total": self.total(precision)}


def inference_flops(cfg: ModelConfig | V32Config, context: int, *, position: str = "last",
                    with_mtp: bool = False, name: str = "") -> FlopCount:
    """Forward FLOPs of one token at `context` (see the module docstring for the conventions).

    Terms: `attention_proj` (query/KV/output projections), `attention_core` (QKᵀ and PV over the
    attended keys), `compressor` (V4 KV compressors: projections and pooling), `indexer` (lightning
    indexer: projections, its compressor, the scores over every visible entry), `mhc` (V4 stream
    mixing), `moe` (router, active routed experts, shared experts; V3.2's dense FFN layers), `head`.
    `with_mtp` adds the MTP block(s) (a speculative-decoding draft, not part of a plain decode step).
    """
    n = _positions(context, position)
    if isinstance(cfg, V32Config):
        return _v32_flops(cfg, n, context, position, with_mtp, name or "deepseek-v3.2")
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"expected a ModelConfig or V32Config, got {type(cfg).__name__}")
    return _v4_flops(cfg, n, context, position, with_mtp, name or "DeepSeek-V4 config")


def _v4_flops(cfg: ModelConfig, n: np.ndarray, context: int, position: str, with_mtp: bool, name: str) -> FlopCount:
    fc = FlopCount(name, context, position)
    D, H, Dh, W = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.sliding_window
    dq, N, Hi, Di = cfg.q_lora_rank, cfg.hc_mult, cfg.index_n_heads, cfg.index_head_dim
    I, E, K = cfg.moe_intermediate_size, cfg.n_routed_experts, cfg.num_experts_per_tok
    expert_prec = "fp4" if cfg.expert_dtype == "fp4" else "fp8"
    layers = list(range(cfg.num_hidden_layers))
    if with_mtp:
        layers += [cfg.num_hidden_layers + k for k in range(cfg.num_nextn_predict_layers)]
    for i in layers:
        m = cfg.layer_ratio(i)
        fc.add("attention_proj", "fp8", 2 * (D * dq + dq * H * Dh + D * Dh + cfg.o_groups * cfg.o_lora_rank * D))
        fc.add("attention_proj", "bf16", 2 * H * Dh * cfg.o_lora_rank)          # wo_a, grouped, kept in BF16
        keys = np.minimum(W, n)
        if m:
            o = int(m == 4)
            w = (1 + o) * Dh
            # wkv + wgate per token; pooling: (1+o)·m slots × c channels per entry, 2 FLOPs each, per m tokens
            fc.add("compressor", "bf16", 2 * 2 * w * D + 2 * (1 + o) * Dh)
            visible = np.floor(n / m)
            if m == 4:
                fc.add("indexer", "fp8", 2 * dq * Hi * Di)
                fc.add("indexer", "bf16", 2 * D * Hi + 2 * 2 * (2 * Di) * D + 2 * 2 * Di)
                fc.add("indexer", "fp4", (2 * Hi * Di + 2 * Hi) * visible.mean())   # Σ_h w_h·ReLU(q_h·K_s)
                keys = keys + np.minimum(cfg.index_topk, visible)
            else:
                keys = keys + visible
        fc.add("attention_core", "bf16", 4 * H * Dh * keys.mean())             # QKᵀ + PV, K = V of width Dh
        mix = (2 + N) * N
        # two sites: mixing matrix, Sinkhorn (row and column sums and divisions), pre collapse, post + comb
        if cfg.hc_mode != "residual":   # (a plain residual, the ablation: its add is not counted)
            fc.add("mhc", "fp32", 2 * (2 * mix * N * D + 4 * cfg.hc_sinkhorn_iters * N * N + 2 * N * D
                                       + 2 * N * D + 2 * N * N * D))
        fc.add("moe", "bf16", 2 * D * E)                                         # router
        fc.add("moe", expert_prec, 2 * K * 3 * D * I)
        fc.add("moe", "fp8", 2 * cfg.n_shared_experts * 3 * D * I)
    fc.add("mhc", "fp32", 2 * N * N * D + 2 * N * D)                             # hc_head
    fc.add("head", "bf16", 2 * D * cfg.vocab_size)
    if with_mtp:
        k = cfg.num_nextn_predict_layers
        fc.add("attention_proj", "fp8", k * 2 * 2 * D * D)                       # e_proj, h_proj
        fc.add("mhc", "fp32", k * (2 * N * N * D + 2 * N * D))
        fc.add("head", "bf16", k * 2 * D * cfg.vocab_size)
    return fc


def _v32_flops(cfg: V32Config, n: np.ndarray, context: int, position: str, with_mtp: bool, name: str) -> FlopCount:
    """V3.2 runs DSA on MLA's MQA (absorbed) form in prefill and decode (V3.2 report §2.1): one shared
    latent entry [kv_lora_rank | rope] per token; a query scores kv_lora_rank + rope dims per key and
    reads kv_lora_rank values, per head, over its top-k keys."""
    fc = FlopCount(name, context, position)
    D, H, dq, dc = cfg.hidden_size, cfg.num_attention_heads, cfg.q_lora_rank, cfg.kv_lora_rank
    dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    Hi, Di = cfg.index_n_heads, cfg.index_head_dim
    I = cfg.moe_intermediate_size
    n_layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if with_mtp else 0)
    for i in range(n_layers):
        # wkv_b's key and value halves are absorbed into the query and the output: the same FLOPs as
        # applying wkv_b once per token
        fc.add("attention_proj", "fp8",
               2 * (D * dq + dq * H * (dn + dr) + D * (dc + dr) + dc * H * (dn + dv) + H * dv * D))
        fc.add("indexer", "fp8", 2 * (dq * Hi * Di + D * Di))                    # wq_b, wk
        fc.add("indexer", "bf16", 2 * D * Hi)                                    # weights_proj
        fc.add("indexer", "fp8", (2 * Hi * Di + 2 * Hi) * n.mean())              # scores over every earlier token
        fc.add("attention_core", "bf16", 2 * H * (dc + dr + dc) * np.minimum(cfg.index_topk, n).mean())
        if i < cfg.first_k_dense_replace:
            fc.add("moe", "fp8", 2 * 3 * D * cfg.intermediate_size)
        else:
            fc.add("moe", "bf16", 2 * D * cfg.n_routed_experts)
            fc.add("moe", "fp8", 2 * (cfg.num_experts_per_tok + cfg.n_shared_experts) * 3 * D * I)
    fc.add("head", "bf16", 2 * D * cfg.vocab_size * (1 + (cfg.num_nextn_predict_layers if with_mtp else 0)))
    if with_mtp:
        fc.add("attention_proj", "fp8", cfg.num_nextn_predict_layers * 2 * 2 * D * D)   # eh_proj [h; e] -> D
    return fc


# ----------------------------------------------------------------------------- KV bytes
def kv_entry_bytes(cfg: ModelConfig | V32Config, fmt: str = "bf16") -> dict[str, float]:
    """Bytes of one cached entry: `main` (V4 window/compressed entry, V3.2 MLA latent) and `index`.

    "bf16": every value BF16, as the reference code, transformers and `dsv4.cache` hold them.
    "fp8": the released storage formats. V4 (report §2.3.4, §3.4): the 448 non-rope dims FP8 with one
    e8m0 scale per 64, the 64 rope dims BF16; indexer keys FP4 with one e8m0 scale per 32. V3.2
    (FlashMLA's FP8 cache): the 512 latent dims FP8 with one fp32 scale per 128, the 64 rope dims BF16
    (656 B); indexer keys FP8 with one fp32 scale per 128 (132 B).
    """
    if fmt not in KV_FORMATS:
        raise ValueError(f"KV format must be one of {KV_FORMATS}, got {fmt!r}")
    if isinstance(cfg, V32Config):
        dc, dr, Di = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.index_head_dim
        if fmt == "bf16":
            return {"main": 2.0 * (dc + dr), "index": 2.0 * Di}
        return {"main": dc + 4 * -(-dc // 128) + 2.0 * dr, "index": Di + 4.0 * -(-Di // 128)}
    Dh, dr, Di = cfg.head_dim, cfg.qk_rope_head_dim, cfg.index_head_dim
    if fmt == "bf16":
        return {"main": 2.0 * Dh, "index": 2.0 * Di}
    nope = Dh - dr
    return {"main": nope + -(-nope // 64) + 2.0 * dr, "index": Di / 2 + -(-Di // 32)}


def kv_bytes(cfg: ModelConfig | V32Config, context: int, fmt: str = "bf16", *, with_mtp: bool = False,
             allocated: bool = False, name: str = "") -> dict[str, Any]:
    """KV-cache bytes of one sequence holding `context` tokens.

    V4 per layer: the window (min(context, W) entries; all W slots with `allocated=True`, as
    `DecodeCache` preallocates them), ⌊context/m⌋ compressed entries, CSA indexer keys ⌊context/4⌋, and
    the compressors' fp32 state (raw projections and gate scores of the open windows). V3.2 per layer:
    one latent entry and one indexer key per token. `per_token` is the growth per token at long context
    (compressed entries only for V4); `fixed` the part independent of the context.
    """
    if context < 0:
        raise ValueError(f"context must be >= 0 tokens, got {context}")
    e = kv_entry_bytes(cfg, fmt)
    out = {"model": name, "context": context, "format": fmt, "entry_bytes": e}
    if isinstance(cfg, V32Config):
        L = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if with_mtp else 0)
        per_token = L * (e["main"] + e["index"])
        return {**out, "model": name or "deepseek-v3.2", "per_token": per_token, "fixed": 0.0,
                "by_type": {"mla": L * e["main"] * context, "indexer": L * e["index"] * context},
                "total": per_token * context}
    W, Dh, Di = cfg.sliding_window, cfg.head_dim, cfg.index_head_dim
    n_layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if with_mtp else 0)
    by_type = {"window": 0.0, "csa": 0.0, "hca": 0.0, "indexer": 0.0, "compressor_state": 0.0}
    per_token = 0.0
    for i in range(n_layers):
        m = cfg.layer_ratio(i)
        by_type["window"] += (W if allocated else min(context, W)) * e["main"]
        if not m:
            continue
        o = int(m == 4)
        by_type["csa" if m == 4 else "hca"] += (context // m) * e["main"]
        by_type["compressor_state"] += 2 * (1 + o) * m * (1 + o) * Dh * 4        # kv + score, fp32
        per_token += e["main"] / m
        if m == 4:
            by_type["indexer"] += (context // 4) * e["index"]
            by_type["compressor_state"] += 2 * 2 * 4 * 2 * Di * 4
            per_token += e["index"] / 4
    total = sum(by_type.values())
    fixed = by_type["window"] + by_type["compressor_state"]
    return {**out, "model": name or "DeepSeek-V4 config", "per_token": per_token, "fixed": fixed,
            "by_type": by_type, "total": total}


# ----------------------------------------------------------------------------- comparison
def compare(model, reference, context: int, *, position: str = "last", precision: str = "fp8",
            kv_format: str = "fp8", with_mtp: bool = False) -> dict[str, float]:
    """The report's two ratios at `context`: per-token FLOPs and KV bytes per sequence of `model` over
    `reference` (each a config; e.g. a V4 preset over `V32Config()`)."""
    f_m = inference_flops(model, context, position=position, with_mtp=with_mtp).total(precision)
    f_r = inference_flops(reference, context, position=position, with_mtp=with_mtp).total(precision)
    k_m = kv_bytes(model, context, kv_format, with_mtp=with_mtp)["total"]
    k_r = kv_bytes(reference, context, kv_format, with_mtp=with_mtp)["total"]
    return {"context": context, "flops": f_m, "flops_reference": f_r, "flops_ratio": f_m / f_r,
            "kv_bytes": k_m, "kv_bytes_reference": k_r, "kv_ratio": k_m / k_r}


# ----------------------------------------------------------------------------- plot
REPORT_CLAIMS = {"deepseek-v4-pro": (0.27, 0.10), "deepseek-v4-flash": (0.10, 0.07)}   # (FLOPs, KV) at 1M


def context_label(n: int) -> str:
    """4096 -> '4K', 1048576 -> '1M' (K = 1024); other counts as they are."""
    for unit, div in (("M", 1 << 20), ("K", 1 << 10)):
        if n % div == 0:
            return f"{n // div}{unit}"
    return f"{n:,}"


def ratio_curves(model, reference, contexts, *, position: str = "last", precision: str = "fp8",
                 kv_format: str = "fp8", with_mtp: bool = False) -> dict[str, list[float]]:
    """FLOPs and KV ratios of `model` over `reference` at each context."""
    rows = [compare(model, reference, n, position=position, precision=precision, kv_format=kv_format,
                    with_mtp=with_mtp) for n in contexts]
    return {"context": list(contexts), "flops_ratio": [r["flops_ratio"] for r in rows],
            "kv_ratio": [r["kv_ratio"] for r in rows]}


def plot_ratios(models, reference, path, *, contexts=None, position: str = "last", precision: str = "fp8",
                kv_format: str = "fp8", with_mtp: bool = False) -> str:
    """PNG of per-token FLOPs and KV-per-sequence ratios to `reference` against context (log scale).

    models: [(config, label)], reference: (config, label). The report's claims at 1M are drawn as
    markers for the released presets (labels `deepseek-v4-pro`, `deepseek-v4-flash`)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = contexts or [int(2 ** (12 + i / 4)) for i in range(33)]        # 4K … 1M, 4 points per octave
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for (cfg, label), color in zip(models, plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        curves = ratio_curves(cfg, reference[0], contexts, position=position, precision=precision,
                              kv_format=kv_format, with_mtp=with_mtp)
        for ax, key, claim_i in ((axes[0], "flops_ratio", 0), (axes[1], "kv_ratio", 1)):
            ys = [100 * y for y in curves[key]]
            ax.plot(contexts, ys, color=color, label=f"{label} ({ys[-1]:.1f}% at {context_label(contexts[-1])})")
            if label in REPORT_CLAIMS:
                claim = 100 * REPORT_CLAIMS[label][claim_i]
                ax.errorbar([contexts[-1]], [claim], yerr=[[3], [3]], fmt="*", ms=12, color=color, capsize=4,
                            label=f"report: {claim:.0f}% (±3 points)")
    names = {"raw": "raw FLOPs", "fp8": "FP8-equivalent FLOPs", "fp8-hopper": "FP8-equivalent, FP4 as FP8"}
    pos = "one decode step at the context" if position == "last" else "mean over the prefill"
    axes[0].set_title(f"per-token FLOPs vs {reference[1]}\n({names[precision]}, {pos})", fontsize=10)
    axes[1].set_title(f"KV cache per sequence vs {reference[1]}\n({kv_format} storage)", fontsize=10)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ticks = [2 ** k for k in range(12, 21, 2)]
        ax.set_xticks(ticks, [context_label(t) for t in ticks])
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("% of the reference")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
