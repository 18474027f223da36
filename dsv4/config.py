"""Model configuration: one frozen dataclass whose field names are the official `config.json` keys.

`ModelConfig.from_hf_config(d)` reads the official file (and transformers' own field names);
`to_hf_config()` writes a dict that both the official layout and transformers 5.17 understand.
Per-layer schedules are data (`compress_ratios`, `num_hash_layers`) validated in `__post_init__`.
Spec: ARCHITECTURE.md §1 (table of keys and released values), §1.2 (layer pattern).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Attention type of a layer, by compression ratio: 0 = sliding window only, 4 = CSA (overlapping
# windows + lightning indexer top-k), any other ratio (128 in the releases) = HCA (dense).
SWA, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
_DEFAULT_YARN = {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                 "beta_fast": 32, "beta_slow": 1}


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and how to fix it."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    num_key_value_heads: int = 1
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128
    # one entry per layer, plus one per MTP block (the official file has num_hidden_layers + 1)
    compress_ratios: tuple[int, ...] = (0, 0) + (4, 128) * 20 + (4, 0)
    compress_rope_theta: float = 160000.0
    rope_theta: float = 10000.0
    rope_scaling: dict | None = field(default_factory=lambda: dict(_DEFAULT_YARN))
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    n_routed_experts: int = 256
    num_experts_per_tok: int = 6
    n_shared_experts: int = 1
    moe_intermediate_size: int = 2048
    num_hash_layers: int = 3
    scoring_func: str = "sqrtsoftplus"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    # research switch (not in the official config.json; written only when not "mhc"): the residual
    # streams' mixing. "mhc": the release (sigmoid pre/post, Sinkhorn-projected doubly stochastic comb);
    # "hc": unconstrained dynamic hyper-connections (static base + scale·tanh(dynamic), as the mHC paper
    # writes HC); "residual": a plain residual h + f (all streams equal, the mixing parameters unused).
    hc_mode: str = "mhc"
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 1
    max_position_embeddings: int = 1048576
    tie_word_embeddings: bool = False
    bos_token_id: int = 0
    eos_token_id: int = 1
    quantization_config: dict | None = None
    expert_dtype: str | None = None
    torch_dtype: str = "bfloat16"

    # ------------------------------------------------------------------ validation
    def __post_init__(self):
        object.__setattr__(self, "compress_ratios", tuple(int(r) for r in self.compress_ratios))
        L, n_mtp = self.num_hidden_layers, self.num_nextn_predict_layers

        def need(cond: bool, name: str, msg: str):
            if not cond:
                raise ConfigError(f"{name}: {msg}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                     "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window", "index_n_heads",
                     "index_head_dim", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
                     "hc_mult", "hc_sinkhorn_iters"):
            v = getattr(self, name)
            need(isinstance(v, int) and v > 0, name, f"must be a positive integer, got {v!r}")
        need(self.num_key_value_heads == 1, "num_key_value_heads",
             f"DeepSeek-V4 has one shared K=V head; got {self.num_key_value_heads}, set it to 1")
        need(0 < self.qk_rope_head_dim <= self.head_dim and self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
             f"must be even and in (0, head_dim={self.head_dim}]; got {self.qk_rope_head_dim}")
        need(self.index_head_dim >= self.qk_rope_head_dim, "index_head_dim",
             f"the indexer ropes its last qk_rope_head_dim={self.qk_rope_head_dim} dims, so index_head_dim "
             f"must be at least that; got {self.index_head_dim}")
        need(self.num_attention_heads % self.o_groups == 0, "o_groups",
             f"num_attention_heads={self.num_attention_heads} must be divisible by o_groups={self.o_groups}; "
             f"pick a divisor of {self.num_attention_heads}")
        need(self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
             f"cannot exceed n_routed_experts={self.n_routed_experts}; got {self.num_experts_per_tok}")
        need(self.n_shared_experts >= 0, "n_shared_experts", f"must be >= 0, got {self.n_shared_experts}")
        need(0 <= self.num_hash_layers <= L, "num_hash_layers",
             f"must be in [0, num_hidden_layers={L}]; got {self.num_hash_layers}")
        need(n_mtp >= 0, "num_nextn_predict_layers", f"must be >= 0, got {n_mtp}")
        need(len(self.compress_ratios) in (L, L + max(n_mtp, 1)), "compress_ratios",
             f"needs one entry per layer plus one per MTP block ({L} + {max(n_mtp, 1)} = {L + max(n_mtp, 1)}) "
             f"or exactly {L}; got {len(self.compress_ratios)} entries")
        bad = [r for r in self.compress_ratios if r < 0 or r == 1]
        need(not bad, "compress_ratios", f"ratios must be 0 (sliding window only) or >= 2; got {bad}")
        need(self.scoring_func in ("sqrtsoftplus", "softmax", "sigmoid"), "scoring_func",
             f"must be 'sqrtsoftplus', 'softmax' or 'sigmoid'; got {self.scoring_func!r}")
        need(self.index_topk > 0, "index_topk", f"must be positive, got {self.index_topk}")
        need(self.swiglu_limit >= 0, "swiglu_limit", f"must be >= 0 (0 disables the clamp), got {self.swiglu_limit}")
        need(self.rms_norm_eps > 0 and self.hc_eps >= 0, "rms_norm_eps/hc_eps", "must be positive")
        need(0 <= self.bos_token_id < self.vocab_size and 0 <= self.eos_token_id < self.vocab_size,
             "bos_token_id/eos_token_id", f"must be ids in [0, vocab_size={self.vocab_size})")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            kind = rs.get("type", rs.get("rope_type"))
            need(kind in ("yarn", None, "default"), "rope_scaling.type", f"only 'yarn' is supported; got {kind!r}")
            if kind == "yarn":
                for k in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow"):
                    need(k in rs, f"rope_scaling.{k}", "missing from the yarn rope_scaling dict")
        need(self.hc_mode in ("mhc", "hc", "residual"), "hc_mode",
             f"must be 'mhc' (the release), 'hc' (unconstrained) or 'residual'; got {self.hc_mode!r}")
        if self.expert_dtype not in (None, "fp4", "fp8", "bf16", "bfloat16"):
            raise ConfigError(f"expert_dtype: must be 'fp4', 'fp8' or null; got {self.expert_dtype!r}")

    # ------------------------------------------------------------------ derived values
    def check_id_range(self, lo: int, hi: int) -> None:
        """A clear error when token ids (their min lo and max hi, read on the host) leave the vocabulary."""
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}); got min {lo}, max {hi} "
                             "(was the input encoded with a different tokenizer?)")

    def layer_ratio(self, layer: int) -> int:
        """Compression ratio of main layer `layer`; layer == num_hidden_layers + k is MTP block k."""
        if layer >= len(self.compress_ratios):
            return 0  # a config without the MTP entry: the MTP block is sliding-window only
        return self.compress_ratios[layer]

    def layer_type(self, layer: int) -> str:
        r = self.layer_ratio(layer)
        return SWA if r == 0 else CSA if r == 4 else HCA

    @property
    def layer_types(self) -> list[str]:
        return [self.layer_type(i) for i in range(self.num_hidden_layers)]

    @property
    def yarn(self) -> dict | None:
        rs = self.rope_scaling
        if not rs or rs.get("type", rs.get("rope_type")) != "yarn":
            return None
        return rs

    def with_(self, **changes) -> "ModelConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ parameter counts
    def param_counts(self) -> dict[str, int]:
        """Total parameters (main model, MTP) and parameters active per token (excluding the embedding)."""
        D, H, Dh, L = self.hidden_size, self.num_attention_heads, self.head_dim, self.num_hidden_layers
        N = self.hc_mult
        mix = (2 + N) * N

        def attn(ratio: int) -> int:
            n = D * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * H * Dh + D * Dh + Dh
            n += H * Dh * self.o_lora_rank + self.o_groups * self.o_lora_rank * D + H
            if ratio:
                w = (2 if ratio == 4 else 1) * Dh
                n += 2 * w * D + ratio * w + Dh
            if ratio == 4:
                iw = 2 * self.index_head_dim
                n += self.q_lora_rank * self.index_n_heads * self.index_head_dim + self.index_n_heads * D
                n += 2 * iw * D + 4 * iw + self.index_head_dim
            return n

        expert = 3 * D * self.moe_intermediate_size
        shared = 3 * D * self.moe_intermediate_size * self.n_shared_experts

        def block(i: int, hashed: bool) -> tuple[int, int]:
            a = attn(self.layer_ratio(i)) + 2 * (mix * N * D + mix + 3) + 2 * D
            router = self.n_routed_experts * D + (0 if hashed else self.n_routed_experts)
            total = a + router + self.n_routed_experts * expert + shared
            active = a + router + self.num_experts_per_tok * expert + shared
            return total, active

        total = active = 0
        for i in range(L):
            t, a = block(i, i < self.num_hash_layers)
            total, active = total + t, active + a
        head = self.vocab_size * D + D + N * N * D + N + 1
        embed = self.vocab_size * D
        mtp = 0
        for k in range(self.num_nextn_predict_layers):
            t, _ = block(L + k, False)
            mtp += t + 2 * D * D + 3 * D + N * N * D + N + 1
        return {"total": total + head + embed, "total_with_mtp": total + head + embed + mtp,
                "active": active + head, "embedding": embed, "mtp": mtp}

    # ------------------------------------------------------------------ config.json I/O
    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> "ModelConfig":
        """Read an official DeepSeek-V4 `config.json` dict, or one written by transformers.

        transformers' names are folded in: `layer_types` (+ `compress_rates`) -> `compress_ratios`,
        `mlp_layer_types` -> `num_hash_layers`, `partial_rotary_factor` -> `qk_rope_head_dim`,
        `rope_parameters` -> `rope_scaling`/`rope_theta`/`compress_rope_theta`.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"config.json must hold a JSON object, got {type(d).__name__}")
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        out: dict[str, Any] = {}
        L = d.get("num_hidden_layers", cls.num_hidden_layers)
        if "layer_types" in d and d["layer_types"] is not None and "compress_ratios" not in d:
            rates = {CSA: 4, HCA: 128, **(d.get("compress_rates") or {})}
            rates[SWA] = 0
            try:
                ratios = [rates[t] for t in d["layer_types"]]
            except KeyError as exc:
                raise ConfigError(f"layer_types: unknown layer type {exc.args[0]!r}; expected one of "
                                  f"{SWA!r}, {CSA!r}, {HCA!r}") from None
            out["compress_ratios"] = ratios + [0] * max(d.get("num_nextn_predict_layers", 1), 1)
        if "mlp_layer_types" in d and d["mlp_layer_types"] is not None and "num_hash_layers" not in d:
            types = list(d["mlp_layer_types"])
            n_hash = sum(t == "hash_moe" for t in types)
            if types[:n_hash] != ["hash_moe"] * n_hash:
                raise ConfigError("mlp_layer_types: hash-routed layers must come first (the official layout)")
            out["num_hash_layers"] = n_hash
        if "partial_rotary_factor" in d and d["partial_rotary_factor"] and "qk_rope_head_dim" not in d:
            out["qk_rope_head_dim"] = int(round(d.get("head_dim", cls.head_dim) * d["partial_rotary_factor"]))
        rp = d.get("rope_parameters")
        if isinstance(rp, dict) and isinstance(rp.get("compress"), dict):
            comp, main = rp["compress"], rp.get("main") or {}
            out.setdefault("compress_rope_theta", comp.get("rope_theta", cls.compress_rope_theta))
            if "rope_theta" in main:
                out.setdefault("rope_theta", main["rope_theta"])
            if comp.get("rope_type", comp.get("type")) == "yarn" and "rope_scaling" not in d:
                out["rope_scaling"] = {"type": "yarn", **{k: comp[k] for k in (
                    "factor", "original_max_position_embeddings", "beta_fast", "beta_slow") if k in comp}}
            elif "rope_scaling" not in d:
                out["rope_scaling"] = None
        for k, v in d.items():
            if k in known and k not in out:
                out[k] = v
        if isinstance(out.get("eos_token_id"), list):
            out["eos_token_id"] = out["eos_token_id"][0]
        if "compress_ratios" not in out:
            raise ConfigError("compress_ratios: missing; the official config.json lists one ratio per layer "
                              "(+1 for the MTP block), transformers' lists `layer_types`")
        if len(out["compress_ratios"]) == L and out.get("num_nextn_predict_layers", 1) > 0:
            out["compress_ratios"] = list(out["compress_ratios"]) + [0]
        try:
            return cls(**out)
        except TypeError as exc:
            raise ConfigError(f"config.json has a value of the wrong type: {exc}") from None

    def to_hf_config(self) -> dict[str, Any]:
        """The config.json we write: official keys plus what transformers 5.17 needs to load it."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["compress_ratios"] = list(self.compress_ratios)
        if len(self.compress_ratios) == self.num_hidden_layers and self.num_nextn_predict_layers > 0:
            d["compress_ratios"] = d["compress_ratios"] + [0] * self.num_nextn_predict_layers
        if d["quantization_config"] is None:
            d.pop("quantization_config")
        if d["expert_dtype"] is None:
            d.pop("expert_dtype")
        if d["hc_mode"] == "mhc":
            d.pop("hc_mode")
        d.update({"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
                  "attention_bias": False, "attention_dropout": 0.0, "hidden_act": "silu", "use_cache": True})
        return d

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"no config.json at {path}: point at a DeepSeek-V4 model folder")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc}); re-download or fix the file") from None
        return cls.from_hf_config(d)


# ---------------------------------------------------------------------- presets
def _flash() -> ModelConfig:
    return ModelConfig()


def _pro() -> ModelConfig:
    return ModelConfig(hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536,
                       o_groups=16, compress_ratios=(128, 128) + (4, 128) * 29 + (4, 0), index_topk=1024,
                       n_routed_experts=384, moe_intermediate_size=3072, routed_scaling_factor=2.5,
                       quantization_config=_FP8_QUANT, expert_dtype="fp4")


_FP8_QUANT = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0",
              "weight_block_size": [128, 128]}

PRESETS: dict[str, Any] = {
    # the released models (hyperparameters of the official config.json files)
    "deepseek-v4-flash": lambda: ModelConfig(quantization_config=_FP8_QUANT, expert_dtype="fp4"),
    "deepseek-v4-pro": _pro,
    # unit-test size: every layer type (SWA, CSA, HCA), a hash layer and MTP; runs in milliseconds on a CPU
    "tiny": lambda: ModelConfig(
        vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, head_dim=64,
        qk_rope_head_dim=16, q_lora_rank=32, o_groups=2, o_lora_rank=16, sliding_window=16,
        compress_ratios=(0, 4, 128, 4, 0), index_n_heads=16, index_head_dim=32, index_topk=16,
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, num_hash_layers=1,
        max_position_embeddings=1 << 20),
    # CPU demo size (a few million parameters): trains in minutes on a laptop
    "mini": lambda: ModelConfig(
        vocab_size=4096, hidden_size=192, num_hidden_layers=6, num_attention_heads=4, head_dim=128,
        qk_rope_head_dim=32, q_lora_rank=96, o_groups=2, o_lora_rank=96, sliding_window=64,
        compress_ratios=(0, 4, 128, 4, 128, 4, 0), index_n_heads=4, index_head_dim=64, index_topk=32,
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=192, num_hash_layers=1,
        max_position_embeddings=1 << 16),
    # one-GPU research size (~200M total parameters, full DeepSeek-V4 vocabulary)
    "small": lambda: ModelConfig(
        vocab_size=129280, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, head_dim=256,
        qk_rope_head_dim=64, q_lora_rank=256, o_groups=4, o_lora_rank=256, sliding_window=128,
        compress_ratios=(0, 4, 128, 4, 128, 4, 128, 4, 0), index_n_heads=16, index_head_dim=64, index_topk=256,
        n_routed_experts=16, num_experts_per_tok=2, moe_intermediate_size=512, num_hash_layers=1,
        max_position_embeddings=1 << 20),
    # the peer-comparison model of TARGETS.md (228M parameters with vocab 32000)
    "bench": lambda: ModelConfig(
        vocab_size=32000, hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, head_dim=512,
        qk_rope_head_dim=64, q_lora_rank=512, o_groups=4, o_lora_rank=512, sliding_window=128,
        compress_ratios=(0, 4, 128, 4, 0), index_n_heads=16, index_head_dim=128, index_topk=512,
        n_routed_experts=16, num_experts_per_tok=2, moe_intermediate_size=512, num_hash_layers=1),
    # the bench model's shape at ~1B total parameters (the MFU figure of TARGETS.md): hidden 2048, 8 layers
    "bench-1b": lambda: ModelConfig(
        vocab_size=32000, hidden_size=2048, num_hidden_layers=8, num_attention_heads=16, head_dim=512,
        qk_rope_head_dim=64, q_lora_rank=1024, o_groups=4, o_lora_rank=1024, sliding_window=128,
        compress_ratios=(0, 4, 128, 4, 128, 4, 128, 4, 0), index_n_heads=16, index_head_dim=128, index_topk=512,
        n_routed_experts=16, num_experts_per_tok=2, moe_intermediate_size=768, num_hash_layers=1),
}


def preset(name: str) -> ModelConfig:
    """A named configuration: the released models or a small research/test size."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


def yarn_low_high(rope_dim: int, theta: float, yarn: dict) -> tuple[int, int]:
    """The YaRN ramp's first and last pair index (spec §5.2); 15 and 25 for the releases."""
    L0 = yarn["original_max_position_embeddings"]

    def corr(n_rot: float) -> float:
        return rope_dim * math.log(L0 / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(corr(yarn["beta_fast"])), 0)
    high = min(math.ceil(corr(yarn["beta_slow"])), rope_dim - 1)
    return low, high
