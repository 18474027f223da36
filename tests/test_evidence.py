"""The ablation switches (`ModelConfig.hc_mode`, `TrainConfig.optimizer`) and the composite-gain
diagnostic of the mHC paper (`dsv4.diagnostics`), each against an independent computation."""
from __future__ import annotations

import pytest
import torch

from conftest import randomize
from dsv4.config import ConfigError, ModelConfig, preset
from dsv4.diagnostics import amax_gains, composite_gain, residual_maps
from dsv4.model import Transformer, hc_pre
from dsv4.train import TrainConfig, build_optimizer


def small(**kw) -> ModelConfig:
    return preset("tiny").with_(num_nextn_predict_layers=0, compress_ratios=(0, 4, 128, 4), **kw)


def test_composite_gain_by_hand():
    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(5, 3, 3, generator=g, dtype=torch.float64) for _ in range(4)]   # 4 sites, 5 tokens
    got = composite_gain(maps)
    for l in range(4):
        for t in range(5):
            p = torch.eye(3, dtype=torch.float64)
            for h in maps[l:]:                     # P_l = H_3 · H_2 ⋯ H_l
                p = h[t] @ p
            fwd = max(abs(float(p[i].sum())) for i in range(3))
            bwd = max(abs(float(p[:, j].sum())) for j in range(3))
            if t == 0:
                acc = [0.0, 0.0]
            acc[0] += fwd / 5
            acc[1] += bwd / 5
        assert got["composite_forward"][l] == pytest.approx(acc[0], rel=1e-12)
        assert got["composite_backward"][l] == pytest.approx(acc[1], rel=1e-12)
    assert got["single_forward"][3] == got["composite_forward"][3]
    assert got["max_composite"] == max(got["composite_forward"] + got["composite_backward"])
    # doubly stochastic maps keep both gains at 1; a map that doubles every stream doubles them per site
    ds = torch.full((2, 4, 4), 0.25, dtype=torch.float64)
    assert composite_gain([ds] * 6)["max_composite"] == pytest.approx(1.0)
    assert composite_gain([2 * torch.eye(2).double()] * 5)["composite_forward"] == pytest.approx([32, 16, 8, 4, 2])
    assert amax_gains(torch.tensor([[1.0, -3.0], [0.5, 0.5]]))[0] == 2.0
    with pytest.raises(ValueError, match="square"):
        composite_gain([torch.ones(2, 3)])


def test_residual_maps_follow_the_forward_pass():
    torch.manual_seed(0)
    model = randomize(Transformer(small()).double()).eval()     # mixes far from the identity start
    ids = torch.randint(0, 512, (1, 130))                      # past 128 tokens: an HCA entry
    maps, h = residual_maps(model, ids)
    assert len(maps) == 2 * 4 and maps[0].shape == (1, 130, 4, 4)
    torch.testing.assert_close(h, model.blocks(ids, torch.arange(130).expand(1, 130)), rtol=0, atol=1e-12)
    # mHC: comb's columns sum to 1 after the last Sinkhorn step, so every H = combᵀ has unit row sums
    torch.testing.assert_close(torch.stack(maps).sum(-1), torch.ones(8, 1, 130, 4, dtype=torch.float64),
                               rtol=0, atol=1e-5)
    assert composite_gain([m[0] for m in maps])["max_composite"] < 1.01


def test_hc_mode_residual_is_a_plain_residual_network():
    """Every stream equals x + attn(norm(x)) + ffn(norm(·)) with x the embedding: computed by hand."""
    torch.manual_seed(1)
    model = Transformer(small(hc_mode="residual")).double().eval()
    ids = torch.randint(0, 512, (1, 70))
    pos = torch.arange(70).expand(1, 70)
    x = model.embed(ids)
    for layer in model.layers:
        x = x + layer.attn(layer.attn_norm(x), pos)[0]
        x = x + layer.ffn(layer.ffn_norm(x), ids)[0]
    h = model.blocks(ids, pos)
    for k in range(4):
        torch.testing.assert_close(h[:, :, k], x, rtol=0, atol=1e-12)


def test_hc_mode_hc_is_unconstrained():
    torch.manual_seed(2)
    B, S, N, D = 2, 3, 4, 8
    h = torch.randn(B, S, N, D, dtype=torch.float64)
    fn = torch.randn((2 + N) * N, N * D, dtype=torch.float64)
    scale, base = torch.tensor([0.5, 0.7, 0.9], dtype=torch.float64), torch.randn(24, dtype=torch.float64)
    x, post, comb = hc_pre(h, fn, scale, base, N, 20, 1e-6, 1e-6, "hc")
    v = h.flatten(2)
    mu = torch.tanh((v @ fn.T) / torch.sqrt((v ** 2).mean(-1, keepdim=True) + 1e-6))
    pre = base[:N] + 0.5 * mu[..., :N]
    torch.testing.assert_close(x, (pre.unsqueeze(-1) * h).sum(2))
    torch.testing.assert_close(post, base[N:2 * N] + 0.7 * mu[..., N:2 * N])
    torch.testing.assert_close(comb, (base[2 * N:] + 0.9 * mu[..., 2 * N:]).view(B, S, N, N))
    # the HC start is the mHC start's function: pre 1/N, post 1, comb the identity
    model = Transformer(small(hc_mode="hc"))
    b = model.layers[0].hc_attn_base.detach()
    assert torch.equal(b, torch.cat([torch.full((4,), 0.25), torch.ones(4), torch.eye(4).flatten()]))
    # and, far from identity, the composite gain of an HC model is free to leave 1
    with torch.no_grad():
        for layer in model.layers:
            layer.hc_attn_base[8:] = (1.5 * torch.eye(4)).flatten()
    maps, _ = residual_maps(model.eval(), torch.randint(0, 512, (1, 20)))
    assert composite_gain([m[0] for m in maps])["max_composite"] > 1.5 ** 4 * 0.9


def test_switches_are_validated_and_round_trip():
    with pytest.raises(ConfigError, match="hc_mode"):
        preset("tiny").with_(hc_mode="dense")
    cfg = preset("tiny").with_(hc_mode="hc")
    assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg
    assert "hc_mode" not in preset("tiny").to_hf_config()        # the release config.json is unchanged
    with pytest.raises(ValueError, match="optimizer must be 'muon' or 'adamw'"):
        TrainConfig(optimizer="sgd")
    model = Transformer(small())
    kinds = {g["name"]: g["kind"] for g in build_optimizer(model, TrainConfig(model=small(), optimizer="adamw")).param_groups}
    assert set(kinds.values()) == {"adamw"} and "muon" in kinds and "muon_experts" in kinds
    kinds = {g["name"]: g["kind"] for g in build_optimizer(model, TrainConfig(model=small())).param_groups}
    assert kinds["muon"] == "muon" and kinds["adamw"] == "adamw"
