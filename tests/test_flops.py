"""The FLOPs / KV calculator (`dsv4.flops`, `dsv4 flops`, `dsv4 kv`) against hand computation, the
cache allocator, the published anchors (TARGETS.md, ARCHITECTURE.md §12.3/§16) and the report's claims."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dsv4.cache import DecodeCache, cache_bytes
from dsv4.cli import main
from dsv4.config import preset
from dsv4.flops import (V32Config, compare, inference_flops, kv_bytes, kv_entry_bytes, plot_ratios,
                        ratio_curves)

GIB = 2 ** 30
M = 1 << 20


def test_v4_inference_flops_by_hand():
    """The `tiny` preset (SWA, CSA, HCA, CSA, + SWA MTP), every term written out from the spec."""
    cfg = preset("tiny").with_(expert_dtype="fp4")
    D, H, Dh, W, dq = 64, 4, 64, 16, 32
    Hi, Di, topk, N, V = 16, 32, 16, 4, 512
    G, dg, I, E, K = 2, 16, 32, 8, 2
    for ctx in (1, 9, 300, 1000):
        ts = [ctx]                                                # position "last": n = ctx visible tokens
        for position, ns in (("last", ts), ("average", list(range(1, ctx + 1)))):
            fc = inference_flops(cfg, ctx, position=position)
            mean = lambda f: sum(f(n) for n in ns) / len(ns)      # noqa: E731
            proj = 4 * 2 * (D * dq + dq * H * Dh + D * Dh + G * dg * D + H * Dh * dg)
            assert fc.term("attention_proj") == proj
            keys = {0: mean(lambda n: min(W, n)), 4: mean(lambda n: min(W, n) + min(topk, n // 4)),
                    128: mean(lambda n: min(W, n) + n // 128)}
            core = sum(4 * H * Dh * keys[r] for r in (0, 4, 128, 4))
            assert fc.term("attention_core") == pytest.approx(core, rel=1e-12)
            comp = 2 * (2 * 2 * 2 * Dh * D + 2 * 2 * Dh) + (2 * 2 * Dh * D + 2 * Dh)   # two CSA + one HCA
            assert fc.term("compressor") == comp
            index = 2 * (2 * dq * Hi * Di + 2 * D * Hi + 2 * 2 * 2 * Di * D + 2 * 2 * Di
                         + (2 * Hi * Di + 2 * Hi) * mean(lambda n: n // 4))
            assert fc.term("indexer") == pytest.approx(index, rel=1e-12)
            mix = (2 + N) * N
            site = 2 * mix * N * D + 4 * 20 * N * N + 2 * N * D + 2 * N * D + 2 * N * N * D
            assert fc.term("mhc") == 4 * 2 * site + 2 * N * N * D + 2 * N * D
            assert fc.term("moe") == 4 * (2 * D * E + 2 * K * 3 * D * I + 2 * 3 * D * I)
            assert fc.term("head") == 2 * D * V
    # precisions: FP4 experts and FP4 index scores weigh 0.5, BF16 terms 2, FP8 1
    fc = inference_flops(cfg, 1000)
    by = fc.terms
    assert by["moe"]["fp4"] == 4 * 2 * K * 3 * D * I and by["moe"]["fp8"] == 4 * 2 * 3 * D * I
    fp8_eq = sum({"fp32": 2, "bf16": 2, "fp8": 1, "fp4": 0.5}[p] * f for t in by.values() for p, f in t.items())
    assert fc.total("fp8") == pytest.approx(fp8_eq) and fc.total("raw") == pytest.approx(
        sum(f for t in by.values() for f in t.values()))
    # the MTP block adds an SWA layer, e_proj/h_proj, its hc_head and a second head
    d = inference_flops(cfg, 1000, with_mtp=True).total("raw") - fc.total("raw")
    mtp_layer = (2 * (D * dq + dq * H * Dh + D * Dh + G * dg * D) + 2 * H * Dh * dg + 4 * H * Dh * W
                 + 2 * site + 2 * D * E + 2 * K * 3 * D * I + 2 * 3 * D * I)
    assert d == pytest.approx(mtp_layer + 2 * 2 * D * D + 2 * N * N * D + 2 * N * D + 2 * D * V)


def test_v32_inference_flops_by_hand():
    """A small DeepSeek-V3.2: MLA in absorbed form over the top-k, the indexer over every earlier token."""
    c = V32Config(vocab_size=100, hidden_size=32, intermediate_size=48, moe_intermediate_size=8,
                  num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=16,
                  kv_lora_rank=12, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5, n_routed_experts=6,
                  num_experts_per_tok=2, n_shared_experts=1, index_n_heads=3, index_head_dim=8, index_topk=5)
    D, H, dq, dc, dn, dr, dv = 32, 4, 16, 12, 6, 4, 5
    for ctx in (3, 40):
        for position, ns in (("last", [ctx]), ("average", list(range(1, ctx + 1)))):
            fc = inference_flops(c, ctx, position=position)
            avg = lambda f: sum(f(n) for n in ns) / len(ns)      # noqa: E731
            proj = 2 * (D * dq + dq * H * (dn + dr) + D * (dc + dr) + dc * H * (dn + dv) + H * dv * D)
            assert fc.term("attention_proj") == 3 * proj
            assert fc.term("attention_core") == pytest.approx(3 * 2 * H * (dc + dr + dc) * avg(lambda n: min(5, n)))
            index = 2 * (dq * 3 * 8 + D * 8) + 2 * D * 3 + (2 * 3 * 8 + 2 * 3) * avg(lambda n: n)
            assert fc.term("indexer") == pytest.approx(3 * index)
            assert fc.term("moe") == 2 * 3 * D * 48 + 2 * (2 * D * 6 + 2 * 3 * 3 * D * 8)
            assert fc.term("head") == 2 * D * 100
    # active parameters of the released V3.2: the published 37B
    assert V32Config().param_counts()["active"] == pytest.approx(37.5e9, rel=0.01)


def test_kv_bytes_match_the_allocator_and_the_anchors():
    tiny = preset("tiny")
    for n in (1, 100, 777):
        alloc = kv_bytes(tiny, n, "bf16", allocated=True, with_mtp=True)["total"]
        assert alloc == cache_bytes(tiny, n)["total"]
        assert alloc == DecodeCache(tiny, 1, n, dtype=torch.bfloat16).nbytes()
        assert kv_bytes(tiny, n, "bf16")["total"] <= alloc
    flash, pro, v32 = preset("deepseek-v4-flash"), preset("deepseek-v4-pro"), V32Config()
    # TARGETS.md: BF16 everywhere Flash 6,880 B/token, Pro 9,848 B/token, V3.2 83.9 GiB at 2^20 tokens
    assert kv_bytes(flash, M, "bf16")["per_token"] == 6880 and kv_bytes(pro, M, "bf16")["per_token"] == 9848
    assert kv_bytes(v32, M, "bf16")["total"] / GIB == pytest.approx(83.875)
    # released formats: V4 entry 448 FP8 + 7 e8m0 scales + 64 BF16 = 583 B, FP4 index key 64 + 4 scales;
    # V3.2 FlashMLA 512 FP8 + 4 fp32 scales + 128 B rope = 656 B, index key 128 + 4 = 132 B
    assert kv_entry_bytes(flash, "fp8") == {"main": 583, "index": 68}
    assert kv_entry_bytes(v32, "fp8") == {"main": 656, "index": 132}
    assert kv_bytes(v32, M, "fp8")["per_token"] == 61 * 788 == 48068
    assert kv_bytes(flash, M, "fp8")["per_token"] == 21 * (583 + 68) / 4 + 20 * 583 / 128
    # the window holds min(context, W) entries; compressed entries only complete windows
    r = kv_bytes(flash, 200, "fp8")
    assert r["by_type"]["window"] == 43 * 128 * 583 and r["by_type"]["hca"] == 20 * 1 * 583
    assert r["by_type"]["csa"] == 21 * 50 * 583 and r["by_type"]["indexer"] == 21 * 50 * 68


@pytest.mark.parametrize("name, flops_claim, kv_claim", [("deepseek-v4-pro", 0.27, 0.10),
                                                           ("deepseek-v4-flash", 0.10, 0.07)])
def test_report_claims_at_1m_within_3_points(name, flops_claim, kv_claim):
    """The headline convention (FP8-equivalent FLOPs of a decode step at 1M, released KV formats)
    lands within ±3 points of the report; the raw count does too (docs/evidence.md has the table)."""
    r = compare(preset(name), V32Config(), M, position="last", precision="fp8", kv_format="fp8")
    assert abs(r["flops_ratio"] - flops_claim) <= 0.03 and abs(r["kv_ratio"] - kv_claim) <= 0.03
    raw = compare(preset(name), V32Config(), M, position="last", precision="raw", kv_format="bf16")
    assert abs(raw["flops_ratio"] - flops_claim) <= 0.03 and abs(raw["kv_ratio"] - kv_claim) <= 0.03


def test_ratio_curves_and_plot(tmp_path):
    curves = ratio_curves(preset("deepseek-v4-pro"), V32Config(), [4096, 65536, M])
    assert np.all(np.diff(curves["flops_ratio"]) < 0) and np.all(np.diff(curves["kv_ratio"]) < 0)
    out = plot_ratios([(preset("deepseek-v4-flash"), "deepseek-v4-flash")], (V32Config(), "deepseek-v3.2"),
                      tmp_path / "r.png", contexts=[4096, 65536, M])
    assert (tmp_path / "r.png").stat().st_size > 10_000 and out.endswith("r.png")


def test_cli_flops_and_kv(capsys, tmp_path):
    assert main(["flops", "deepseek-v4-pro", "--context", "4K,1M", "--json"]) == 0
    recs = json.loads(capsys.readouterr().out)
    assert [r["context"] for r in recs] == [4096, M]
    want = compare(preset("deepseek-v4-pro"), V32Config(), M)
    assert recs[1]["total"] == pytest.approx(want["flops"]) and recs[1]["ratio"] == pytest.approx(want["flops_ratio"])
    assert main(["kv", "deepseek-v4-flash", "--context", "1M", "--json", "--format", "bf16"]) == 0
    rec = json.loads(capsys.readouterr().out)[0]
    assert rec["per_token"] == 6880 and rec["ratio"] == pytest.approx(rec["total"] / (83.875 * GIB))
    # a V3.2 config.json is read as the MLA model; text output names the terms and the ratio
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v32", "num_hidden_layers": 61}))
    assert main(["flops", str(tmp_path), "--vs", "deepseek-v3.2", "--precision", "raw"]) == 0
    out = capsys.readouterr().out
    assert "indexer" in out and "→ 100.0%" in out
    assert main(["kv", "deepseek-v4-pro", "--vs", "none", "--batch", "2"]) == 0
    assert "batch of 2" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["flops", "deepseek-v4-pro", "--context", "12Q"], "not a token count"),
    (["flops", "deepseek-v4-pro", "--context", "0"], "whole number of tokens"),
    (["flops", "no-such-model"], "neither a folder"),
    (["kv", "deepseek-v4-pro", "--batch", "0"], "--batch must be a positive"),
])
def test_cli_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="context must be a positive"):
        inference_flops(preset("tiny"), 0)
    with pytest.raises(ValueError, match="position must be one of"):
        inference_flops(preset("tiny"), 10, position="middle")
    with pytest.raises(ValueError, match="precision must be one of"):
        inference_flops(preset("tiny"), 10).total("fp16")
    with pytest.raises(ValueError, match="KV format must be one of"):
        kv_bytes(preset("tiny"), 10, "fp16")
    with pytest.raises(ValueError, match="num_attention_heads: must be an integer >= 1"):
        V32Config(num_attention_heads=0)
    with pytest.raises(TypeError, match="expected a ModelConfig or V32Config"):
        inference_flops({"hidden_size": 1}, 10)
