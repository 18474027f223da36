"""Quantised-resident models (`load_pretrained(quantized=True)`): FP8 / FP4 weights kept as stored give the
logits of the dequantise-on-load model on the official golden checkpoint, hold exactly the analytic number of
bytes, load one rank's experts alone, and random checkpoints at the released shapes (`dsv4 convert
--random-like`) load both ways."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors import safe_open

if not torch.cuda.is_available():   # kernels run in Triton's interpreter on CPU (read when they are imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dsv4 import ops, quant
from dsv4.cache import DecodeCache
from dsv4.checkpoint import CheckpointError, convert_checkpoint, load_pretrained, save_pretrained
from dsv4.cli import main as cli
from dsv4.commands.convert import random_like_config
from dsv4.config import preset

from conftest import GOLDEN_DIR

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module")
def golden():
    with safe_open(str(GOLDEN_DIR / "golden.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def dequantised():
    return load_pretrained(GOLDEN_DIR, quantized=False)


@pytest.fixture(scope="module")
def resident():
    return load_pretrained(GOLDEN_DIR, quantized=True)


# ----------------------------------------------------------------------------- logits
def test_resident_modules_keep_the_stored_formats(resident, dequantised):
    fp8 = {n: m for n, m in resident.named_modules() if isinstance(m, quant.FP8Linear)}
    fp4 = {n: m for n, m in resident.named_modules() if isinstance(m, quant.FP4Experts)}
    # every FP8 matrix of the release (wo_a too, which the official code dequantises), every MoE's experts:
    # 5 blocks (4 layers, MTP) of wq_a, wq_b, wkv, wo_a, wo_b and 3 shared-expert matrices, 2 indexers' wq_b,
    # the MTP's e_proj and h_proj
    assert len(fp8) == 5 * 8 + 2 + 2 and len(fp4) == 5 and sum(n.endswith("wo_a") for n in fp8) == 5
    for name, m in fp8.items():
        assert m.weight.dtype == torch.float8_e4m3fn and m.scale.dtype == torch.float8_e8m0fnu
        assert torch.equal(m.dequantize(), dequantised.get_submodule(name).weight)
    e = resident.layers[3].ffn.experts
    assert e.w1.dtype == torch.int8 and e.w1.shape == (8, 32, 32) and e.w2_scale.shape == (8, 64, 1)
    weight_map = json.loads((GOLDEN_DIR / "model.safetensors.index.json").read_text())["weight_map"]
    key = "layers.0.ffn.experts.5.w2"
    stored = {}
    for k in (key + ".weight", key + ".scale"):                                   # the stored bytes, unchanged
        with safe_open(str(GOLDEN_DIR / weight_map[k]), "pt") as f:
            stored[k] = f.get_tensor(k)
    assert torch.equal(resident.layers[0].ffn.experts.w2[5], stored[key + ".weight"])
    assert torch.equal(resident.layers[0].ffn.experts.w2_scale[5].view(torch.uint8),
                       stored[key + ".scale"].view(torch.uint8))
    # moving the model keeps the formats (float8 buffers are not widened by .to(dtype))
    copy = load_pretrained(GOLDEN_DIR, quantized=True).to(torch.float64)
    assert copy.layers[1].attn.wq_b.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(copy.layers[1].attn.wq_b.weight, resident.layers[1].attn.wq_b.weight)


@pytest.mark.parametrize("n", [5, 129])
def test_resident_prefill_logits_equal_the_dequantised_model(resident, dequantised, golden, n):
    ids = golden["input_ids"][:, :n]
    with torch.no_grad():
        out, ref = resident(ids)[:, -1], dequantised(ids)[:, -1]
    assert rel(out, ref) <= 1e-5
    assert rel(out, golden[f"prefill_logits_n{n}"]) <= 1e-5          # the official code's logits


def test_resident_cached_decode_and_mtp(resident, dequantised, golden):
    """Chunked prefill across the 128-token HCA boundary, then single-token decode steps; the MTP block."""
    ids = golden["input_ids"]
    outs = []
    with torch.no_grad():
        for m in (resident, dequantised):
            cache = DecodeCache(m.config, 2, 140)
            m(ids[:, :100], cache=cache, last_only=True)
            steps = [m(ids[:, 100:127], cache=cache, last_only=True)]
            steps += [m(ids[:, 127 + i:128 + i], cache=cache, last_only=True) for i in range(4)]
            mtp = m.mtp_logits(golden["mtp_hidden"][:, :64], ids[:, 1:65])[:, -1]
            outs.append((torch.stack(steps, 1), mtp))
    assert rel(outs[0][0], outs[1][0]) <= 1e-5
    assert rel(outs[0][1], outs[1][1]) <= 1e-5 and rel(outs[0][1], golden["mtp_logits_n64"]) <= 1e-5


def test_resident_model_on_the_triton_kernels(resident, dequantised, golden):
    """The whole golden model with every FP8 linear and FP4 MoE on the Triton kernels (CPU: interpreter)."""
    ids = golden["input_ids"]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = resident.to(dev)
    ops.set_backend({"fp8_linear": "triton", "fp4_experts": "triton"})
    try:
        with torch.no_grad():
            out = model(ids[:, :6].to(dev))
    finally:
        ops.set_backend(None)
        resident.to("cpu")
    with torch.no_grad():
        assert rel(out.cpu(), dequantised(ids[:, :6])) <= 1e-5


def test_packed_fp8_projections_give_the_same_model(resident, dequantised, golden, monkeypatch):
    """pack_projections on a quantised-resident model: the FP8 layers of a group (here the CSA layers' wq_b
    with the indexer's; the golden's other groups are narrower than a 128-row scale block) get their
    weights and block scales back to back and run as one FP8 GEMM. Same state dict and bytes, the same
    logits as the dequantised model (prefill, cached decode), on the twins and on the Triton kernels
    (CPU: interpreter), with one FP8 call fewer per packed group."""
    from dsv4.attention import packed_fp8
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_pretrained(GOLDEN_DIR, quantized=True, device=dev)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    size = quant.resident_bytes(model)
    assert model.pack_projections() == 3 + 2         # the compressors' bf16 groups, the 2 FP8 query groups
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k].view(torch.uint8), v.view(torch.uint8))
                                                 for k, v in before.items())
    assert quant.resident_bytes(model) == size
    attn = model.layers[1].attn
    w, sc = packed_fp8([attn.wq_b, attn.indexer.wq_b])
    assert torch.equal(w.view(torch.uint8), torch.cat([attn.wq_b.weight, attn.indexer.wq_b.weight]).view(torch.uint8))
    assert sc.shape[0] == attn.wq_b.scale.shape[0] + attn.indexer.wq_b.scale.shape[0]
    calls = {}
    real = ops.fp8_linear
    ids = golden["input_ids"]
    with torch.no_grad():
        ref = dequantised(ids[:, :129])[:, -1]
        for name, m in (("unpacked", resident), ("packed", model)):
            calls[name] = []
            monkeypatch.setattr(ops, "fp8_linear", lambda *a, _c=calls[name], **k: _c.append(a[1].shape) or real(*a, **k))
            assert rel(m(ids[:, :129].to(m.embed.weight.device))[:, -1].cpu(), ref) <= 1e-5
        assert len(calls["packed"]) == len(calls["unpacked"]) - 2 and torch.Size([256 + 512, 32]) in calls["packed"]
        outs = []
        for m in (model, dequantised):
            d = m.embed.weight.device
            cache = DecodeCache(m.config, 2, 140, device=d)
            m(ids[:, :100].to(d), cache=cache, last_only=True)
            outs.append(torch.stack([m(ids[:, 100 + i:101 + i].to(d), cache=cache, last_only=True).cpu()
                                     for i in range(3)], 1))
        assert rel(outs[0], outs[1]) <= 1e-5
        ops.set_backend({"fp8_linear": "triton", "fp4_experts": "triton"})
        try:
            assert rel(model(ids[:, :6].to(dev)).cpu(), dequantised(ids[:, :6])) <= 1e-5
        finally:
            ops.set_backend(None)


def test_fp8_packing_needs_whole_scale_blocks():
    """FP8 layers pack when every layer but the last has a whole number of 128-row scale blocks (the
    stacked scales then stay aligned with the stacked rows); a group's bf16 layer runs beside them. Packed
    outputs equal the layers run one by one (twin and Triton kernel), against float64."""
    from torch import nn
    from dsv4.attention import linears, pack, packed_fp8
    g = torch.Generator().manual_seed(3)
    dev = "cuda" if torch.cuda.is_available() else "cpu"

    def fp8_layer(out, inp=256):
        m = quant.FP8Linear(inp, out)
        m.weight, m.scale = (t.to(dev) for t in quant.quant_fp8(torch.randn(out, inp, generator=g) / inp ** 0.5))
        return m
    plain = nn.Linear(256, 40, bias=False).to(dev)
    group = [fp8_layer(128), fp8_layer(256), plain, fp8_layer(72)]
    want = [quant.dequant_fp8(m.weight, m.scale, dtype=torch.float64) if isinstance(m, quant.FP8Linear)
            else m.weight.double() for m in group]
    x = torch.randn(3, 256, generator=g).to(dev)
    assert pack(group) and packed_fp8([m for m in group if m is not plain]) is not None
    with torch.no_grad():
        for backend in (None, {"fp8_linear": "triton"}):
            ops.set_backend(backend)
            try:
                got = linears(x, group)
            finally:
                ops.set_backend(None)
            assert all(rel(y.cpu(), x.cpu().double() @ w.cpu().T) <= 1e-5 for y, w in zip(got, want))
    assert not pack([fp8_layer(100), fp8_layer(128)])          # 100 rows: the second layer's scales would shift
    assert packed_fp8([fp8_layer(100), fp8_layer(128)]) is None


# ----------------------------------------------------------------------------- bytes
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resident_bytes_equal_the_analytic_size(dtype, capsys):
    model = load_pretrained(GOLDEN_DIR, quantized=True, dtype=dtype)
    got = quant.resident_bytes(model)
    assert got == quant.analytic_resident_bytes(model.config, dtype)
    # FP8: one byte per weight + one per 128x128 block; FP4: half a byte + one per 32 (tiny: every matrix < 128)
    assert got["fp8"] == sum(m.weight.numel() for m in model.modules() if isinstance(m, quant.FP8Linear))
    dense = quant.resident_bytes(load_pretrained(GOLDEN_DIR, quantized=False, dtype=dtype))
    assert dense["total"] == quant.analytic_resident_bytes(model.config, dtype, fp8=False, fp4_experts=False)["total"]
    assert dense["total"] > 2 * got["total"] if dtype == torch.float32 else dense["total"] > got["total"]
    name = "fp32" if dtype == torch.float32 else "bf16"
    assert cli(["info", str(GOLDEN_DIR), "--dtype", name, "--expert-parallel", "2"]) == 0
    text = capsys.readouterr().out
    assert f"quantised-resident ({name}, as load_pretrained(quantized=True) holds them): " in text
    assert f"({got['total']:,} B = " in text and f"({dense['total']:,} B)" in text
    half = load_pretrained(GOLDEN_DIR, quantized=True, dtype=dtype, experts=range(0, 4))
    per_rank = re.search(r"split over 2 ranks .*: (\S+ \S+) per rank", text).group(1)
    assert quant.resident_bytes(half)["total"] == quant.analytic_resident_bytes(model.config, dtype, n_experts=4)["total"]
    from dsv4.commands.info import human_bytes
    assert per_rank == human_bytes(quant.resident_bytes(half)["total"])


def test_analytic_size_reproduces_the_flash_release():
    """The official V4-Flash index's total_size (spec §0, [OFF:idx]) = our resident bytes, to the byte."""
    cfg = preset("deepseek-v4-flash")
    b = quant.analytic_resident_bytes(cfg, torch.bfloat16)
    assert b["total"] == 159_609_485_896
    assert 148 < b["total"] / 2 ** 30 < 149                      # does not fit one 139 GiB GPU: EP over 2


# ----------------------------------------------------------------------------- expert shares and errors
@pytest.mark.parametrize("quantized", [True, False])
def test_loading_one_ranks_experts(resident, dequantised, quantized):
    part = load_pretrained(GOLDEN_DIR, quantized=quantized, experts=range(2, 5))
    for i in (0, 3):
        mine, full = part.layers[i].ffn.experts, (resident if quantized else dequantised).layers[i].ffn.experts
        for k, t in mine.state_dict().items():
            assert t.shape[0] == 3 and torch.equal(t, full.state_dict()[k][2:5]), k
    assert part.layers[0].ffn.gate.weight.shape[0] == 8                  # the router still sees every expert


def test_errors(tmp_path, resident):
    convert_checkpoint(GOLDEN_DIR, tmp_path / "bf16")
    with pytest.raises(ValueError, match="stores no FP8/FP4 tensors"):
        load_pretrained(tmp_path / "bf16", quantized=True)
    assert not any(isinstance(m, quant.FP8Linear) for m in load_pretrained(tmp_path / "bf16").modules())
    for bad in (range(6, 9), range(0, 8, 2), range(3, 3), [0, 1]):
        with pytest.raises(ValueError, match="experts must be a range"):
            load_pretrained(GOLDEN_DIR, experts=bad)
    with pytest.raises(ValueError, match="quantized=False to save it"):
        save_pretrained(resident, tmp_path / "x")
    # a power-of-two check guards FP4 scales stored as fp32
    with pytest.raises(CheckpointError, match="powers of two"):
        from dsv4.checkpoint import _Item, _resident_scale
        _resident_scale(_Item("k", tmp_path, "I8", (1, 16), [], scale_key="k.scale"), torch.tensor([[0.3]]),
                        torch.float8_e8m0fnu)


# ----------------------------------------------------------------------------- random checkpoints
def test_random_like_config_follows_the_preset():
    cfg = random_like_config("deepseek-v4-flash", layers=4)
    assert cfg.compress_ratios == (0, 0, 4, 128, 0) and cfg.num_hash_layers == 3 and cfg.hidden_size == 4096
    assert cfg.quantization_config["weight_block_size"] == [128, 128] and cfg.expert_dtype == "fp4"
    cfg = random_like_config("deepseek-v4-flash", layers=2, mtp=0, experts=16)
    assert cfg.compress_ratios == (0, 0) and cfg.num_hash_layers == 2 and cfg.n_routed_experts == 16
    with pytest.raises(ValueError, match="--experts >= 6"):
        random_like_config("deepseek-v4-flash", experts=4)


def test_random_checkpoint_loads_both_ways(tmp_path):
    dst = tmp_path / "rand"
    assert cli(["convert", "--random-like", "tiny", "--fp8", "--fp4-experts", "--layers", "3", "--seed", "3",
                "--max-shard-gb", "0.0003", str(dst)]) == 0
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1                                 # several shards
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3 and cfg["expert_dtype"] == "fp4" and "quantization_config" in cfg
    shard = dst / index["weight_map"]["layers.1.attn.wq_b.weight"]
    with safe_open(str(shard), "pt") as f:
        assert f.get_slice("layers.1.attn.wq_b.weight").get_dtype() == "F8_E4M3"
    with safe_open(str(dst / index["weight_map"]["layers.2.ffn.experts.7.w2.weight"]), "pt") as f:
        assert f.get_slice("layers.2.ffn.experts.7.w2.weight").get_dtype() == "I8"
    a, b = load_pretrained(dst, quantized=False), load_pretrained(dst, quantized=True)
    assert quant.resident_bytes(b) == quant.analytic_resident_bytes(b.config, torch.float32)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la, lb = a(ids), b(ids)
    assert torch.isfinite(la).all() and la.std() > 0.1 and rel(lb, la) <= 1e-5
    # the same seed gives the same tensors whatever the shard size
    assert cli(["convert", "--random-like", "tiny", "--fp8", "--fp4-experts", "--layers", "3", "--seed", "3",
                str(tmp_path / "again")]) == 0
    c = load_pretrained(tmp_path / "again", quantized=False)
    assert all(torch.equal(t, c.state_dict()[k]) for k, t in a.state_dict().items())
    assert cli(["convert", "--random-like", "tiny", str(dst), str(tmp_path / "y")]) == 2
    assert cli(["convert", "--random-like", "tiny", str(dst)]) == 2                  # exists, no --overwrite


# ----------------------------------------------------------------------------- commands
def test_generate_quantized_flag(capsys, monkeypatch, dequantised):
    prompt = [5, 17, 300, 42]
    assert cli(["generate", "--model", str(GOLDEN_DIR), "--prompt-ids", ",".join(map(str, prompt)),
                "--max-new-tokens", "4", "--print-ids", "--device", "cpu", "--quantized"]) == 0
    captured = capsys.readouterr()
    assert "weights: quantised-resident" in captured.err and "fp8_linear=torch, fp4_experts=torch" in captured.err
    ids = list(prompt)
    with torch.no_grad():                                      # greedy with the dequantised model
        for _ in range(4):
            ids.append(int(dequantised(torch.tensor([ids]))[0, -1].argmax()))
    assert [int(x) for x in captured.out.split()] == ids[len(prompt):]
    monkeypatch.setenv("WORLD_SIZE", "2")                      # as under torchrun: chat/serve refuse
    monkeypatch.setenv("RANK", "1")
    from dsv4.commands.generate import load

    class Args:
        model, device, dtype, quantized = str(GOLDEN_DIR), "cpu", None, None
    from dsv4.cli import CLIError
    with pytest.raises(CLIError, match="only `dsv4 generate` runs expert-parallel"):
        load(Args())
