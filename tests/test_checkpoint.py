"""Checkpoint I/O: golden logits from the official-format folder, parity with transformers in both
directions, exact and quantised round trips, strict errors, and the `info` / `convert` commands."""
from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dsv4 import quant
from dsv4.checkpoint import (CheckpointError, FP8_MATRICES, convert_checkpoint, load_pretrained,
                             official_to_transformers, save_pretrained, transformers_to_official)
from dsv4.cli import main as cli
from dsv4.config import ConfigError, preset
from dsv4.model import keeps_fp32

from conftest import GOLDEN_DIR, random_hf_model, random_model

# three layer mixes that cover SWA, CSA and HCA layers, hash layers of each kind, and MTP
VARIANTS = {"tiny": ((0, 4, 128, 4, 0), 1), "csa": ((4, 4, 0), 1), "hca-first": ((128, 0, 4, 0), 2)}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def variant(name: str):
    ratios, n_hash = VARIANTS[name]
    return preset("tiny").with_(num_hidden_layers=len(ratios) - 1, compress_ratios=ratios, num_hash_layers=n_hash)


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def golden():
    with safe_open(str(GOLDEN_DIR / "golden.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def golden_model():
    return load_pretrained(GOLDEN_DIR)


# ----------------------------------------------------------------------------- the golden checkpoint
@pytest.mark.parametrize("n", [1, 4, 5, 127, 128, 129, 300])
def test_golden_prefill_logits(golden_model, golden, n):
    with torch.no_grad():
        out = golden_model(golden["input_ids"][:, :n])[:, -1]
    assert rel(out, golden[f"prefill_logits_n{n}"]) <= 1e-5


@pytest.mark.parametrize("n", [64, 299])
def test_golden_mtp_logits(golden_model, golden, n):
    with torch.no_grad():
        out = golden_model.mtp_logits(golden["mtp_hidden"][:, :n], golden["input_ids"][:, 1:n + 1])[:, -1]
    assert rel(out, golden[f"mtp_logits_n{n}"]) <= 1e-5


def test_golden_dtypes_and_bf16_load(golden_model):
    m = load_pretrained(GOLDEN_DIR, dtype=torch.bfloat16)
    for name, t in m.state_dict().items():
        if name.endswith("tid2eid"):
            assert t.dtype == torch.int64
        elif keeps_fp32(name):
            assert t.dtype == torch.float32, name
        else:
            assert t.dtype == torch.bfloat16, name
    # FP8 / FP4 values are exact in bf16
    ref = golden_model.state_dict()
    assert all(torch.equal(t.float(), ref[k].float()) for k, t in m.state_dict().items())
    assert len(golden_model.mtp) == 1 and golden_model.layers[0].ffn.gate.tid2eid.shape == (512, 2)


# ----------------------------------------------------------------------------- transformers parity
@pytest.mark.parametrize("name", list(VARIANTS))
def test_transformers_save_loads_with_same_logits(name, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = variant(name)
    hf = random_hf_model(cfg, seed=len(name))
    assert hf.model.layers[-1].self_attn.sinks.abs().min() > 0
    hf.save_pretrained(tmp_path / "hf")
    # what transformers 5.17 really writes: official names under `model.`, with a few exceptions
    keys = set(load_file(tmp_path / "hf" / "model.safetensors"))
    assert {"head.weight", "model.embed_tokens.weight", "model.norm.weight", "model.hc_head.hc_fn",
            "model.layers.0.attn.norm.weight", "model.layers.0.ffn.experts.0.w1.weight",
            "model.layers.0.ffn.gate.tid2eid"} <= keys
    assert not any("mtp" in k or "gate_up_proj" in k for k in keys)

    ours = load_pretrained(tmp_path / "hf")
    assert len(ours.mtp) == 0
    ids = torch.randint(0, cfg.vocab_size, (1, 300), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert rel(ours(ids), hf(ids).logits) <= 1e-5

    # and back: our files (both layouts) give transformers exactly the model it saved
    for layout in ("official", "transformers"):
        save_pretrained(ours, tmp_path / layout, dtype=torch.float32, layout=layout)
        back, info = AutoModelForCausalLM.from_pretrained(tmp_path / layout, output_loading_info=True)
        assert not any(info.values()), info
        assert same_state(back, hf)


def test_our_save_gives_transformers_the_same_logits(golden_model, tmp_path):
    from transformers import AutoModelForCausalLM

    save_pretrained(golden_model, tmp_path / "m", dtype=torch.float32)   # official names, incl. mtp.0.*
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path / "m", output_loading_info=True)
    assert not any(info.values()), info
    assert next(hf.parameters()).dtype == torch.float32
    ids = torch.randint(0, 512, (1, 300), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert rel(hf(ids).logits, golden_model(ids)) <= 1e-5


def test_transformers_module_names_with_stacked_experts(tmp_path):
    cfg = variant("tiny")
    hf = random_hf_model(cfg, seed=3)
    hf.save_pretrained(tmp_path / "saved")
    (tmp_path / "raw").mkdir()
    shutil.copy(tmp_path / "saved" / "config.json", tmp_path / "raw")
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, tmp_path / "raw" / "model.safetensors")
    reference = load_pretrained(tmp_path / "saved")
    assert same_state(load_pretrained(tmp_path / "raw"), reference)
    # the streaming converter splits the stacked experts too
    convert_checkpoint(tmp_path / "raw", tmp_path / "official", dtype=torch.float32)
    keys = json.loads((tmp_path / "official" / "model.safetensors.index.json").read_text())["weight_map"]
    assert "layers.2.ffn.experts.7.w3.weight" in keys and "embed.weight" in keys
    assert same_state(load_pretrained(tmp_path / "official"), reference)


def test_key_map_round_trips():
    for official in ("embed.weight", "head.weight", "hc_head_fn", "layers.3.attn.kv_norm.weight",
                     "layers.1.attn.indexer.compressor.ape", "layers.0.ffn.experts.5.w2.weight", "layers.2.ffn.gate.bias"):
        assert transformers_to_official(official_to_transformers(official)) == official
        module = official_to_transformers(official, saved=False)
        if module is not None:
            assert transformers_to_official(module) == official
    assert official_to_transformers("layers.3.attn.kv_norm.weight", saved=False) == \
        "model.layers.3.self_attn.kv_norm.weight"
    assert official_to_transformers("layers.3.attn.compressor.norm.weight", saved=False) == \
        "model.layers.3.self_attn.compressor.kv_norm.weight"
    assert official_to_transformers("mtp.0.e_proj.weight") is None


# ----------------------------------------------------------------------------- round trips
def test_fp32_round_trip_is_exact(tmp_path):
    m = random_model("tiny", seed=4)
    save_pretrained(m, tmp_path / "m", dtype=torch.float32, max_shard_bytes=100_000)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = load_pretrained(tmp_path / "m")
    assert same_state(back, m) and back.config == m.config.with_(torch_dtype="float32")


def test_default_save_uses_the_release_dtypes(tmp_path):
    m = random_model("tiny", seed=5)
    save_pretrained(m, tmp_path / "m")
    with safe_open(str(next((tmp_path / "m").glob("model-*.safetensors"))), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["layers.0.ffn.gate.tid2eid"] == "I64" and dtypes["layers.1.ffn.gate.bias"] == "F32"
    assert dtypes["layers.1.hc_attn_fn"] == dtypes["layers.2.attn.compressor.ape"] == "F32"
    assert dtypes["embed.weight"] == dtypes["layers.1.attn.q_norm.weight"] == dtypes["layers.0.attn.wq_a.weight"] == "BF16"
    back = load_pretrained(tmp_path / "m")
    ref = m.state_dict()
    for k, t in back.state_dict().items():
        expect = ref[k] if keeps_fp32(k) or not t.is_floating_point() else ref[k].bfloat16().float()
        assert torch.equal(t, expect), k


def test_fp8_fp4_round_trip_equals_quantise_dequantise(tmp_path):
    m = random_model("tiny", seed=6)
    save_pretrained(m, tmp_path / "q", fp8=True, fp4_experts=True, dtype=torch.float32)
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128] and cfg["expert_dtype"] == "fp4"
    with safe_open(str(next((tmp_path / "q").glob("model-*.safetensors"))), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["layers.1.attn.wq_b.weight"] == "F8_E4M3" and dtypes["layers.1.attn.wq_b.scale"] == "F8_E8M0"
    assert dtypes["mtp.0.e_proj.weight"] == "F8_E4M3" and dtypes["layers.1.ffn.experts.3.w2.weight"] == "I8"
    assert dtypes["layers.1.attn.compressor.wkv.weight"] == "F32" and "layers.1.attn.compressor.wkv.scale" not in dtypes
    back = load_pretrained(tmp_path / "q").state_dict()
    n_fp8 = 0
    for k, t in m.state_dict().items():
        if k.endswith((".experts.w1", ".experts.w2", ".experts.w3")):
            expect = torch.stack([quant.fake_quant(w, "fp4") for w in t])
        elif any(k == s or k.endswith("." + s) for s in FP8_MATRICES):
            expect, n_fp8 = quant.fake_quant(t, "fp8"), n_fp8 + 1
        else:
            expect = t
        assert torch.equal(back[k], expect), k
    assert n_fp8 == 4 * 8 + 2 + 10   # 5 attn + 3 shared per layer, indexer wq_b (2 CSA layers), MTP + e/h_proj


def test_convert_command_between_layouts_and_formats(golden_model, tmp_path):
    assert cli(["convert", str(GOLDEN_DIR), str(tmp_path / "fp32"), "--dtype", "fp32"]) == 0
    assert same_state(load_pretrained(tmp_path / "fp32"), golden_model)
    assert cli(["convert", str(tmp_path / "fp32"), str(tmp_path / "hf"), "--layout", "transformers",
                "--fp8", "--fp4-experts"]) == 0
    keys = set(json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"])
    assert "model.layers.1.attn.wq_b.weight_scale_inv" in keys and "mtp.0.e_proj.weight" in keys
    # the golden values are already FP8/FP4 values: re-quantising them is exact
    assert same_state(load_pretrained(tmp_path / "hf"), golden_model)
    assert cli(["convert", str(tmp_path / "fp32"), str(tmp_path / "hf")]) == 2      # DST exists
    assert cli(["convert", str(tmp_path / "nope"), str(tmp_path / "x")]) == 2


# ----------------------------------------------------------------------------- strict errors
@pytest.fixture
def folder(tmp_path):
    """A writable copy of the golden folder and a helper to edit one of its shards."""
    dst = tmp_path / "ckpt"
    shutil.copytree(GOLDEN_DIR, dst, ignore=shutil.ignore_patterns("golden.safetensors", "README.md"))
    index = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]

    def edit(fn, key="layers.0.attn_norm.weight"):
        shard = dst / index[key]
        tensors = load_file(shard)
        fn(tensors)
        save_file(tensors, shard, metadata={"format": "pt"})
    return dst, edit


def load_error(path) -> str:
    with pytest.raises(CheckpointError) as exc:
        load_pretrained(path)
    return str(exc.value)


def test_missing_unexpected_shape_dtype_are_listed_together(folder):
    path, edit = folder

    def damage(t):
        del t["layers.0.attn_norm.weight"]
        t["layers.0.attn.extra.weight"] = torch.zeros(3)
    edit(damage)
    edit(lambda t: t.update({"layers.1.attn.attn_sink": torch.zeros(5)}), "layers.1.attn.attn_sink")
    edit(lambda t: t.update({"layers.0.ffn.gate.tid2eid": t["layers.0.ffn.gate.tid2eid"].float()}),
         "layers.0.ffn.gate.tid2eid")
    msg = load_error(path)
    assert "1 missing tensor:" in msg and "layers.0.attn_norm.weight" in msg
    assert "1 unexpected tensor:" in msg and "layers.0.attn.extra.weight" in msg
    assert "wrong shape" in msg and "layers.1.attn.attn_sink: [5] in the file, [4] expected" in msg
    assert "wrong dtype" in msg and "layers.0.ffn.gate.tid2eid: F32" in msg
    # strict=False loads anyway; the missing norm gets its initial value (ones)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = load_pretrained(path, strict=False)
    assert caught and torch.equal(m.layers[0].attn_norm.weight, torch.ones(64))


def test_many_missing_tensors_are_counted_and_capped(folder):
    path, edit = folder
    edit(lambda t: [t.pop(k) for k in [k for k in t if ".ffn.experts." in k and k.endswith(".weight")]],
         "layers.0.ffn.experts.0.w1.weight")
    msg = load_error(path)
    assert "missing tensors:" in msg and "... and" in msg
    assert "unexpected" in msg and "a scale without a quantised weight" in msg


def test_fp8_weight_without_scale(folder):
    path, edit = folder
    edit(lambda t: t.pop("layers.2.attn.wo_b.scale"), "layers.2.attn.wo_b.scale")
    assert "layers.2.attn.wo_b.scale (the block scales of the F8_E4M3 weight" in load_error(path)


def test_truncated_shard(folder):
    path, _ = folder
    shard = path / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    msg = load_error(path)
    assert "model-00002-of-00002.safetensors" in msg and "truncated or corrupt" in msg


def test_index_pointing_at_a_missing_shard(folder):
    path, _ = folder
    (path / "model-00002-of-00002.safetensors").unlink()
    msg = load_error(path)
    assert "model-00002-of-00002.safetensors" in msg and "not in" in msg
    (path / "model.safetensors.index.json").write_text("{not json")
    assert "not a valid shard index" in load_error(path)


def test_bad_config_json(folder):
    path, _ = folder
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text("{\"hidden_size\": 64,")
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        load_pretrained(path)
    (path / "config.json").write_text(json.dumps({**cfg, "o_groups": 3}))
    with pytest.raises(ConfigError, match=r"config\.json: o_groups"):
        load_pretrained(path)
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pretrained(path)
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        load_pretrained(path / "nope")


def test_save_is_atomic(tmp_path, monkeypatch):
    m = random_model("tiny", seed=7)
    save_pretrained(m, tmp_path / "m", dtype=torch.float32)
    with pytest.raises(FileExistsError):
        save_pretrained(m, tmp_path / "m")
    import safetensors.torch

    calls = []

    def failing(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        return save_file(tensors, filename, metadata=metadata)
    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(m, tmp_path / "new", max_shard_bytes=100_000)
    with pytest.raises(OSError, match="disk full"):
        calls.clear()
        save_pretrained(m, tmp_path / "m", max_shard_bytes=100_000, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]      # no partial folder left behind
    assert same_state(load_pretrained(tmp_path / "m"), m)           # the old folder is intact


def test_tokenizer_files_are_copied(tmp_path):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    (tmp_path / "tok" / "tokenizer_config.json").write_text("{}")
    save_pretrained(random_model("tiny"), tmp_path / "m", tokenizer_dir=tmp_path / "tok")
    assert (tmp_path / "m" / "tokenizer.json").exists() and (tmp_path / "m" / "tokenizer_config.json").exists()


# ----------------------------------------------------------------------------- dsv4 info
def test_info_on_the_golden_folder(capsys):
    assert cli(["info", str(GOLDEN_DIR), "--context", "300", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "0-3  SWA* CSA  HCA  CSA" in out and "MTP 0  SWA" in out
    assert "per token: 97 B" in out and "batch of 2" in out and "FP8 e4m3 44" in out


def test_info_on_the_flash_preset(capsys):
    from dsv4.cache import cache_bytes

    assert cli(["info", "deepseek-v4-flash", "--context", "1048576"]) == 0
    out = capsys.readouterr().out
    assert "total 284.33B" in out and "active per token 13.27B" in out
    assert "counts: SWA 2, CSA 21, HCA 20" in out
    assert "per token: 6,880 B" in out                         # spec §12.3, BF16 compressed entries
    total = cache_bytes(preset("deepseek-v4-flash"), 1 << 20)["total"]
    assert f"{total:,} B" in out and "6.74 GiB" in out
    assert cli(["info", "no-such-model"]) == 2
