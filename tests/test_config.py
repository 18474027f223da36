"""ModelConfig: presets equal the released config values, official/transformers config.json I/O, validation."""
from __future__ import annotations

import json

import pytest

from dsv4.config import ConfigError, ModelConfig, preset, yarn_low_high

from conftest import GOLDEN_DIR


def test_flash_and_pro_presets_match_the_release():
    f, p = preset("deepseek-v4-flash"), preset("deepseek-v4-pro")
    assert (f.hidden_size, f.num_hidden_layers, f.num_attention_heads, f.q_lora_rank, f.o_groups) == (4096, 43, 64, 1024, 8)
    assert (p.hidden_size, p.num_hidden_layers, p.num_attention_heads, p.q_lora_rank, p.o_groups) == (7168, 61, 128, 1536, 16)
    assert f.compress_ratios[:3] == (0, 0, 4) and f.compress_ratios[-2:] == (4, 0) and len(f.compress_ratios) == 44
    assert p.compress_ratios[:3] == (128, 128, 4) and p.compress_ratios[-2:] == (4, 0) and len(p.compress_ratios) == 62
    assert f.layer_types.count("compressed_sparse_attention") == 21 and f.layer_types.count("heavily_compressed_attention") == 20
    assert p.layer_types.count("compressed_sparse_attention") == 30 and p.layer_types.count("heavily_compressed_attention") == 31
    assert (f.index_topk, p.index_topk, f.routed_scaling_factor, p.routed_scaling_factor) == (512, 1024, 1.5, 2.5)
    assert (f.n_routed_experts, p.n_routed_experts, f.moe_intermediate_size, p.moe_intermediate_size) == (256, 384, 2048, 3072)
    # parameter counts of spec §1.1: Flash 284.3B total (290.9B with MTP), 13.3B active; Pro 1573B, 48.9B active
    fc, pc = f.param_counts(), p.param_counts()
    assert abs(fc["total"] / 1e9 - 284.3) < 0.2 and abs(fc["total_with_mtp"] / 1e9 - 290.9) < 0.2
    assert abs(fc["active"] / 1e9 - 13.3) < 0.05 and abs(pc["active"] / 1e9 - 48.9) < 0.05
    assert abs(pc["total"] / 1e9 - 1573) < 1 and abs(pc["total_with_mtp"] / 1e9 - 1599) < 1
    # the peer-comparison model of TARGETS.md has 228M parameters
    assert abs(preset("bench").param_counts()["total"] / 1e6 - 228) < 1


def test_yarn_ramp_of_the_release():
    assert yarn_low_high(64, 160000.0, preset("deepseek-v4-flash").yarn) == (15, 25)


def test_official_config_json_roundtrip():
    d = json.loads((GOLDEN_DIR / "config.json").read_text())
    cfg = ModelConfig.from_hf_config(d)
    assert cfg.compress_ratios == (0, 4, 128, 4, 0) and cfg.num_hash_layers == 1 and cfg.sliding_window == 16
    assert cfg.rope_scaling["factor"] == 16 and cfg.quantization_config["fmt"] == "e4m3"
    assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg


def test_transformers_names_are_understood():
    from transformers import DeepseekV4Config

    cfg = preset("tiny")
    hf = DeepseekV4Config(**cfg.to_hf_config())
    assert hf.layer_types == ["sliding_attention", "compressed_sparse_attention",
                              "heavily_compressed_attention", "compressed_sparse_attention"]
    assert hf.mlp_layer_types == ["hash_moe", "moe", "moe", "moe"]
    assert hf.rope_parameters["compress"]["rope_type"] == "yarn" and hf.rope_parameters["main"]["rope_theta"] == 10000
    # what transformers writes back (its own field names) reads as the same model
    back = ModelConfig.from_hf_config(hf.to_dict())
    for f in ("compress_ratios", "num_hash_layers", "qk_rope_head_dim", "rope_theta", "compress_rope_theta",
              "hidden_size", "index_topk", "sliding_window", "o_groups"):
        assert getattr(back, f) == getattr(cfg, f), f
    assert back.yarn["factor"] == 16 and back.yarn["original_max_position_embeddings"] == 65536


@pytest.mark.parametrize("change, field", [
    (dict(compress_ratios=(0, 4, 128)), "compress_ratios"),
    (dict(num_attention_heads=6, o_groups=4), "o_groups"),
    (dict(qk_rope_head_dim=128, head_dim=64), "qk_rope_head_dim"),
    (dict(compress_ratios=(0, -4, 128, 4, 0)), "compress_ratios"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(num_hash_layers=7), "num_hash_layers"),
    (dict(num_key_value_heads=8), "num_key_value_heads"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(scoring_func="relu"), "scoring_func"),
    (dict(rope_scaling={"type": "yarn", "factor": 16}), "rope_scaling"),
])
def test_invalid_combinations_name_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        preset("tiny").with_(**change)


def test_malformed_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(ConfigError, match="compress_ratios"):
        ModelConfig.from_json(tmp_path)
    with pytest.raises(FileNotFoundError):
        ModelConfig.from_json(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("deepseek-v5")
