"""Reading and writing DeepSeek-V4 checkpoints: the official layout and transformers' layout.

Spec: ARCHITECTURE.md §13 (tensor names, shapes, dtypes), §11.1 (FP8 / FP4 formats).

`load_pretrained(path)` streams a checkpoint folder tensor by tensor into a model whose parameters
start on the meta device, so peak memory is about the final model plus one tensor. FP8 / FP4 weights
are dequantised on the way, or kept in their storage format (`quantized=True`, the default on CUDA:
`dsv4.quant.FP8Linear` / `FP4Experts`); `experts=range(a, b)` loads one rank's share of the routed
experts (`dsv4.parallel.inference`). `save_pretrained(model, path)` writes config.json, the shard index and
the shards into a temporary folder next to `path` and renames it into place at the end.

Names. The model's state_dict names are the official ones, except the routed experts, which the
model stacks (`layers.{i}.ffn.experts.w1` [E, I, D]) and the files store one tensor per expert
(`layers.{i}.ffn.experts.{e}.w1.weight`). transformers' module names differ (`KEY_MAP` below); what
transformers 5.17's `save_pretrained` writes is a third spelling: it reverses its load-time renames,
which gives the official names under a `model.` prefix, except for the rows of the table's last
column that differ (e.g. `model.embed_tokens.weight`, `model.layers.{i}.attn.norm.weight` for the
attention's `kv_norm`). The loader accepts all three; `layout="transformers"` writes the last one.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dsv4 import quant
from dsv4.config import ConfigError, ModelConfig
from dsv4.model import Transformer, keeps_fp32

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
FP8_QUANT_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0",
                    "weight_block_size": [128, 128]}
# matrices that the official release stores as FP8 e4m3 with 128×128 block scales (spec §13.1)
FP8_MATRICES = ("attn.wq_a.weight", "attn.wq_b.weight", "attn.wkv.weight", "attn.wo_a.weight", "attn.wo_b.weight",
                "attn.indexer.wq_b.weight", "ffn.shared_experts.w1.weight", "ffn.shared_experts.w2.weight",
                "ffn.shared_experts.w3.weight", "e_proj.weight", "h_proj.weight")
EXPERT_STACKS = (".experts.w1", ".experts.w2", ".experts.w3")   # our stacked routed-expert parameters
MAX_LISTED = 10          # problems listed per kind in a CheckpointError
PROGRESS_MIN_TENSORS = 300

# ----------------------------------------------------------------------------- the key map
# One row per tensor: official name (= ours, but for the stacked experts) | transformers module name |
# the name transformers 5.17 `save_pretrained` writes ("=": the official name under `model.`).
# `L.` = `layers.{i}.`, `M.` = `model.layers.{i}.`, `{e}` = routed expert. `[e,:I]` / `[e,I:]` / `[e]`:
# transformers stacks the experts, w1 and w3 into one `gate_up_proj` [E, 2I, D] (w1 rows first), w2
# into `down_proj` [E, D, I]. Block scales: official `X.scale`, transformers `X.weight_scale_inv` (for
# weight `X.weight`). `mtp.{k}.*` (the MTP block: the `L.` rows plus e_proj, h_proj, enorm, hnorm,
# norm, hc_head_*) exists only in the official layout; transformers ignores it.
KEY_MAP = """
embed.weight                            model.embed_tokens.weight                                  model.embed_tokens.weight
head.weight                             lm_head.weight                                             head.weight
norm.weight                             model.norm.weight                                          =
hc_head_fn                              model.hc_head.hc_fn                                        model.hc_head.hc_fn
hc_head_base                            model.hc_head.hc_base                                      model.hc_head.hc_base
hc_head_scale                           model.hc_head.hc_scale                                     model.hc_head.hc_scale
L.hc_attn_fn                            M.attn_hc.fn                                               =
L.hc_attn_base                          M.attn_hc.base                                             =
L.hc_attn_scale                         M.attn_hc.scale                                            =
L.hc_ffn_fn                             M.ffn_hc.fn                                                =
L.hc_ffn_base                           M.ffn_hc.base                                              =
L.hc_ffn_scale                          M.ffn_hc.scale                                             =
L.attn_norm.weight                      M.input_layernorm.weight                                   =
L.ffn_norm.weight                       M.post_attention_layernorm.weight                          =
L.attn.attn_sink                        M.self_attn.sinks                                          =
L.attn.wq_a.weight                      M.self_attn.q_a_proj.weight                                =
L.attn.q_norm.weight                    M.self_attn.q_a_norm.weight                                =
L.attn.wq_b.weight                      M.self_attn.q_b_proj.weight                                =
L.attn.wkv.weight                       M.self_attn.kv_proj.weight                                 =
L.attn.kv_norm.weight                   M.self_attn.kv_norm.weight                                 M.attn.norm.weight
L.attn.wo_a.weight                      M.self_attn.o_a_proj.weight                                =
L.attn.wo_b.weight                      M.self_attn.o_b_proj.weight                                =
L.attn.compressor.wkv.weight            M.self_attn.compressor.kv_proj.weight                      =
L.attn.compressor.wgate.weight          M.self_attn.compressor.gate_proj.weight                    =
L.attn.compressor.ape                   M.self_attn.compressor.position_bias                       =
L.attn.compressor.norm.weight           M.self_attn.compressor.kv_norm.weight                      =
L.attn.indexer.wq_b.weight              M.self_attn.compressor.indexer.q_b_proj.weight             =
L.attn.indexer.weights_proj.weight      M.self_attn.compressor.indexer.scorer.weights_proj.weight  =
L.attn.indexer.compressor.wkv.weight    M.self_attn.compressor.indexer.kv_proj.weight              =
L.attn.indexer.compressor.wgate.weight  M.self_attn.compressor.indexer.gate_proj.weight            =
L.attn.indexer.compressor.ape           M.self_attn.compressor.indexer.position_bias               =
L.attn.indexer.compressor.norm.weight   M.self_attn.compressor.indexer.kv_norm.weight              =
L.ffn.gate.weight                       M.mlp.gate.weight                                          =
L.ffn.gate.bias                         M.mlp.gate.e_score_correction_bias                         =
L.ffn.gate.tid2eid                      M.mlp.gate.tid2eid                                         =
L.ffn.shared_experts.w1.weight          M.mlp.shared_experts.gate_proj.weight                      =
L.ffn.shared_experts.w2.weight          M.mlp.shared_experts.down_proj.weight                      =
L.ffn.shared_experts.w3.weight          M.mlp.shared_experts.up_proj.weight                        =
L.ffn.experts.{e}.w1.weight             M.mlp.experts.gate_up_proj[e,:I]                           =
L.ffn.experts.{e}.w3.weight             M.mlp.experts.gate_up_proj[e,I:]                           =
L.ffn.experts.{e}.w2.weight             M.mlp.experts.down_proj[e]                                 =
"""


def _pattern(template: str) -> re.Pattern:
    rx = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
    return re.compile(rx + "$")


@dataclass(frozen=True)
class _Row:
    official: str
    module: str          # transformers module name, without the `[...]` slice
    part: str            # "" or the stacked slice: "e", "e,:I", "e,I:"
    saved: str


def _fill(template: str, m: re.Match) -> str:
    for k, v in m.groupdict().items():
        template = template.replace("{" + k + "}", v)
    return template


def _parse_key_map() -> list[_Row]:
    def expand(name: str) -> str:
        return name.replace("M.", "model.layers.{i}.", 1) if name.startswith("M.") else \
            name.replace("L.", "layers.{i}.", 1) if name.startswith("L.") else name

    rows = []
    for line in KEY_MAP.strip().splitlines():
        official, module, saved = line.split()
        official, module = expand(official), expand(module)
        saved = "model." + official if saved == "=" else expand(saved)
        part = ""
        if "[" in module:
            module, part = module[:-1].split("[")
        rows.append(_Row(official, module, part, saved))
    return rows


ROWS = _parse_key_map()
_OFFICIAL_RX = [(_pattern(r.official), r) for r in ROWS]
_MODULE_RX = [(_pattern(r.module), r) for r in ROWS if not r.part]
_STACKED_RX = [(_pattern(r.module), r) for r in ROWS if r.part]
_SAVED_RX = [(_pattern(r.saved), r) for r in ROWS]
_EXPERT_RX = re.compile(r"^(?P<pre>.*\.ffn\.experts)\.(?P<e>\d+)\.(?P<w>w[123])\.weight$")


def official_to_transformers(name: str, saved: bool = True) -> str | None:
    """Official name -> the name transformers 5.17 writes (`saved=True`) or its module name; None for
    MTP tensors, which transformers does not have, and for module names of the stacked experts."""
    for rx, row in _OFFICIAL_RX:
        m = rx.match(name)
        if m:
            if saved:
                return _fill(row.saved, m)
            return None if row.part else _fill(row.module, m)
    return None


def transformers_to_official(name: str) -> str | None:
    """A transformers file or module name (not a stacked expert tensor) -> the official name, or None."""
    for table in (_SAVED_RX, _MODULE_RX):
        for rx, row in table:
            m = rx.match(name)
            if m:
                return _fill(row.official, m)
    bare = name[len("model."):] if name.startswith("model.") else name
    return bare if bare.startswith("mtp.") else None


def official_to_ours(name: str) -> tuple[str, int | None]:
    """Official name -> (our parameter name, expert index or None)."""
    m = _EXPERT_RX.match(name)
    if m:
        return f"{m.group('pre')}.{m.group('w')}", int(m.group("e"))
    return name, None


def ours_to_official(name: str, expert: int | None = None) -> str:
    if expert is None:
        return name
    pre, w = name.rsplit(".", 1)
    return f"{pre}.{expert}.{w}.weight"


# ----------------------------------------------------------------------------- errors
class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message lists every problem found."""


@dataclass
class _Problems:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape: list[str] = field(default_factory=list)
    dtype: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.shape or self.dtype)

    def message(self, where: Path, strict: bool) -> str:
        lines = [f"{where}: the checkpoint does not match the model built from its config.json"
                 + (" (load_pretrained(strict=False) skips these)" if strict else "")]
        for what, items in (("missing tensor", self.missing), ("unexpected tensor", self.unexpected),
                            ("tensor with the wrong shape", self.shape), ("tensor with the wrong dtype", self.dtype)):
            if items:
                plural = "s" if len(items) > 1 else ""
                more = f"\n    ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
                listed = "\n    ".join(items[:MAX_LISTED])
                lines.append(f"  {len(items)} {what}{plural}:\n    {listed}{more}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- reading the folder
_FLOAT = {"F64", "F32", "F16", "BF16"}
_INT = {"I64", "I32", "I16", "I8", "U8"}
_PACKED = {"I8", "U8"}                       # FP4 e2m1, two codes per byte
_SCALE = {"F8_E8M0", "F32", "BF16", "F16"}


def read_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a checkpoint folder; config errors name the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint folder: {path}")
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder; point at the folder that holds config.json")
    try:
        return ModelConfig.from_json(path)
    except ConfigError as exc:
        if str(path) in str(exc):
            raise
        raise ConfigError(f"{path / 'config.json'}: {exc}") from None


def weight_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The shard files of a folder (from its index, or the single model.safetensors) and the index map."""
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid shard index ({type(exc).__name__}: {exc}); "
                                  "it needs a JSON object with a 'weight_map'; re-download it") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"{index} lists {len(missing)} shard file(s) that are not in {path}: "
                                  f"{', '.join(missing[:MAX_LISTED])}; the download is incomplete, fetch them again")
        return [path / n for n in names], weight_map
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE], None
    raise FileNotFoundError(f"no {INDEX_FILE} or {SINGLE_FILE} in {path}")


def open_shard(file: Path, stack: contextlib.ExitStack):
    """safe_open a shard (kept open by `stack`); an unreadable header becomes a CheckpointError."""
    from safetensors import SafetensorError, safe_open

    try:
        return stack.enter_context(safe_open(str(file), framework="pt"))
    except (SafetensorError, OSError) as exc:
        size = file.stat().st_size if file.exists() else 0
        raise CheckpointError(f"{file} ({size:,} bytes) cannot be read as safetensors: {exc}. The file looks "
                              "truncated or corrupt; download it again") from None


@dataclass
class _Item:
    """One stored tensor and where it goes: `targets` = [(our name, expert or None, row slice or None)]."""
    key: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    targets: list[tuple[str, int | None, slice | None]]
    fmt: str = "plain"           # plain | fp8 | fp4 | int
    scale_key: str | None = None


def detect_layout(keys) -> str:
    """'transformers' when names carry transformers' `model.` prefix or module names, else 'official'."""
    keys = list(keys)
    if any(k.startswith("model.") or k == "lm_head.weight" for k in keys):
        return "transformers"
    return "official"


def _resolve(key: str, layout: str, cfg: ModelConfig) -> list[tuple[str, int | None, slice | None]] | None:
    if layout == "official":
        name, e = official_to_ours(key)
        return [(name, e, None)]
    for rx, row in _STACKED_RX:   # transformers' stacked experts: all experts at once
        m = rx.match(key)
        if m:
            pre = f"layers.{m.group('i')}.ffn.experts"
            I = cfg.moe_intermediate_size
            if row.part == "e":
                return [(f"{pre}.w2", None, None)]
            if row.part == "e,:I":
                return [(f"{pre}.w1", None, slice(0, I)), (f"{pre}.w3", None, slice(I, 2 * I))]
            return []  # the w3 half: covered by the w1 row
    official = transformers_to_official(key)
    if official is None:
        return None
    name, e = official_to_ours(official)
    return [(name, e, None)]


def _scale_key_for(key: str, layout: str) -> str | None:
    if key.endswith(".weight"):
        return key[: -len("weight")] + ("scale" if layout == "official" else "weight_scale_inv")
    return None


def _is_scale(key: str) -> bool:
    return key.endswith(".scale") or key.endswith(".weight_scale_inv")


def _is_tensor(key: str, layout: str, cfg: ModelConfig, expected) -> bool:
    targets = _resolve(key, layout, cfg)
    return targets is not None and all(name in expected for name, _, _ in targets)


def _plan(files, weight_map, handles, cfg: ModelConfig, model: nn.Module, layout: str,
          block: tuple[int, int]) -> tuple[list[_Item], _Problems, dict[str, Path]]:
    """Check every stored tensor's name, shape and dtype against the model from the headers alone."""
    expected = model.state_dict(keep_vars=True)
    where: dict[str, Path] = {}
    problems = _Problems()
    for f in files:
        for k in handles[f].keys():
            if k in where:
                problems.unexpected.append(f"{k} (stored twice: {where[k].name} and {f.name})")
            else:
                where[k] = f
    # names the index lists but no shard holds: reported with the missing tensors, with a note
    not_in_shard = {k: shard for k, shard in (weight_map or {}).items() if k not in where}
    items, used_scales = [], set()
    covered: dict[str, set] = {}
    for k, f in where.items():
        targets = _resolve(k, layout, cfg)
        if targets is None or any(name not in expected for name, _, _ in targets):
            if not _is_scale(k):   # scales are checked below: each must belong to a quantised weight
                problems.unexpected.append(f"{k} ({f.name})")
            continue
        if not targets:
            continue
        sl = handles[f].get_slice(k)
        item = _Item(k, f, sl.get_dtype(), tuple(sl.get_shape()), targets)
        for name, e, _ in targets:   # present (even if unusable): not reported as missing
            covered.setdefault(name, set()).add(e)
        scale_key = _scale_key_for(k, layout)
        if scale_key in where:
            used_scales.add(scale_key)
        scale = handles[where[scale_key]].get_slice(scale_key) if scale_key in where else None
        problem = _check_item(item, expected[targets[0][0]], scale_key, scale, block)
        if problem:
            getattr(problems, problem[0]).append(problem[1])
        if not problem or problem[0] == "unexpected":
            items.append(item)
    for k, f in where.items():
        if _is_scale(k) and k not in used_scales and not _is_tensor(k, layout, cfg, expected):
            problems.unexpected.append(f"{k} ({f.name}; a scale without a quantised weight)")
    missing = []
    for name in expected:
        got = covered.get(name, set())
        if name.endswith(EXPERT_STACKS):
            if None not in got:
                missing += [_display(ours_to_official(name, e), layout)
                            for e in range(cfg.n_routed_experts) if e not in got]
        elif not got:
            missing.append(_display(name, layout))
    for k in dict.fromkeys(missing + list(not_in_shard)):
        note = f" (the index places it in {not_in_shard.pop(k)}, which does not hold it)" if k in not_in_shard else ""
        problems.missing.append(k + note)
    return items, problems, where


def _check_item(item: _Item, target: torch.Tensor, scale_key: str | None, scale, block) -> tuple[str, str] | None:
    """Set the item's storage format; return (problem kind, message) if it cannot fill `target`."""
    k = item.key
    name, expert, rows = item.targets[0]
    want = list(target.shape[1:] if expert is not None else target.shape)
    if rows is not None:          # transformers' gate_up_proj holds w1 and w3
        want[1] = 2 * want[1]
    want = tuple(want)
    if not target.is_floating_point():
        item.fmt = "int"
        if item.dtype not in _INT:
            return "dtype", f"{k}: {item.dtype} in the file, an integer type expected"
    elif item.dtype == "F8_E4M3" or (item.dtype in _PACKED and scale is not None):
        item.fmt = "fp8" if item.dtype == "F8_E4M3" else "fp4"
        if len(want) != 2 or rows is not None:
            return "dtype", f"{k}: {item.dtype} is only supported for one 2-D matrix, this tensor is {list(want)}"
        if scale is None:
            return "missing", f"{scale_key} (the block scales of the {item.dtype} weight {k})"
        item.scale_key = scale_key
        stored = want if item.fmt == "fp8" else (want[0], want[1] // 2)
        sblock = block if item.fmt == "fp8" else (1, quant.FP4_BLOCK)
        swant = (-(-want[0] // sblock[0]), -(-want[1] // sblock[1]))
        sshape = tuple(scale.get_shape())
        if item.shape != stored or sshape != swant:
            return "shape", (f"{k}: {list(item.shape)} with scale {list(sshape)} in the file, {list(stored)} with "
                             f"scale {list(swant)} expected ({item.fmt})")
        if scale.get_dtype() not in _SCALE:
            return "dtype", f"{scale_key}: {scale.get_dtype()} in the file, F8_E8M0 or F32 expected"
        return None
    elif item.dtype not in _FLOAT:
        return "dtype", f"{k}: {item.dtype} in the file, a float type (or F8_E4M3 / FP4 with a scale) expected"
    if item.shape != want:
        return "shape", f"{k}: {list(item.shape)} in the file, {list(want)} expected"
    if scale is not None:
        return "unexpected", f"{scale_key} (a scale for the unquantised {item.dtype} weight {k})"
    return None


def _display(official: str, layout: str) -> str:
    if layout == "official":
        return official
    return official_to_transformers(official) or official


# ----------------------------------------------------------------------------- building the empty model
def empty_model(cfg: ModelConfig) -> Transformer:
    """A Transformer whose parameters and buffers live on the meta device (no memory, no init)."""
    with torch.device("meta"):
        return Transformer(cfg)


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=module._parameters[leaf].requires_grad)
    else:
        module._buffers[leaf] = value


def _target_dtype(name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    if not t.is_floating_point():
        return t.dtype
    if isinstance(t, nn.Parameter):
        return torch.float32 if keeps_fp32(name) and dtype != torch.float64 else dtype
    return torch.float64 if dtype == torch.float64 else t.dtype   # buffers: gate.bias stays fp32


def _decode(item: _Item, raw: torch.Tensor, scale: torch.Tensor | None, block, dtype) -> torch.Tensor:
    if item.fmt == "fp8":
        return quant.dequant_fp8(raw, scale, block, dtype=dtype)
    if item.fmt == "fp4":
        return quant.dequant_fp4(raw, scale, dtype=dtype)
    if item.fmt == "int":
        return raw.to(torch.int64)
    return raw.to(dtype)


@torch.no_grad()
def _init_missing(model: Transformer, names: list[str], device, dtype) -> None:
    """strict=False: give tensors the checkpoint lacks the model's training initialisation."""
    proxy = nn.Module()
    current = model.state_dict(keep_vars=True)
    for name in names:
        t = current[name]
        value = torch.zeros(t.shape, device=device, dtype=_target_dtype(name, t, dtype))
        _assign(model, name, value)
        owner = proxy
        parts = name.split(".")
        for p in parts[:-1]:
            if not hasattr(owner, p):
                owner.add_module(p, nn.Module())
            owner = getattr(owner, p)
        if isinstance(t, nn.Parameter):
            owner.register_parameter(parts[-1], model.get_parameter(name))
        else:
            owner.register_buffer(parts[-1], model.get_buffer(name))
    proxy.config = model.config
    Transformer.init_weights(proxy)


@dataclass
class _Checkpoint:
    """An opened checkpoint folder, checked against the model its config describes."""
    path: Path
    cfg: ModelConfig
    layout: str
    model: Transformer                 # parameters on the meta device
    items: list[_Item]
    problems: _Problems
    handles: dict
    where: dict[str, Path]
    block: tuple[int, int]

    def read(self, item: _Item, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        try:
            raw = self.handles[item.file].get_tensor(item.key).to(device)
            scale = None
            if item.scale_key is not None:
                scale = self.handles[self.where[item.scale_key]].get_tensor(item.scale_key).to(device)
        except Exception as exc:  # a shard that ends early or holds garbage
            raise CheckpointError(f"{item.file}: reading {item.key} failed ({exc}); the file looks truncated "
                                  "or corrupt, download it again") from None
        return raw, scale

    def check(self, strict: bool) -> None:
        if self.problems:
            if strict:
                raise CheckpointError(self.problems.message(self.path, strict=True))
            warnings.warn(self.problems.message(self.path, strict=False), stacklevel=3)


@contextlib.contextmanager
def open_checkpoint(path: str | os.PathLike):
    """Open a checkpoint folder: its config, layout and the plan of every tensor (headers only)."""
    path = Path(path)
    cfg = read_config(path)
    files, weight_map = weight_files(path)
    with contextlib.ExitStack() as stack:
        handles = {f: open_shard(f, stack) for f in files}
        keys = [k for f in files for k in handles[f].keys()]
        layout = detect_layout(keys)
        has_mtp = any(re.match(r"^(model\.)?mtp\.", k) for k in keys)
        if layout == "transformers" and not has_mtp and cfg.num_nextn_predict_layers:
            cfg = cfg.with_(num_nextn_predict_layers=0)
        model = empty_model(cfg)
        block = tuple((cfg.quantization_config or {}).get("weight_block_size") or quant.FP8_BLOCK)
        items, problems, where = _plan(files, weight_map, handles, cfg, model, layout, block)
        yield _Checkpoint(path, cfg, layout, model, items, problems, handles, where, block)


def load_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    strict: bool = True, progress: bool | None = None, quantized: bool | None = None,
                    experts: range | None = None) -> Transformer:
    """Load a DeepSeek-V4 checkpoint folder into a `Transformer` (eval mode).

    Reads the official layout (config.json + `model.safetensors.index.json` + shards, or one
    `model.safetensors`; FP8 e4m3 / FP4 e2m1 weights with e8m0 scales, bf16, fp32, int64 `tid2eid`) and
    the layout transformers' `save_pretrained` writes (as well as transformers' module names with
    stacked experts). transformers drops the MTP block, so a transformers-layout folder without
    `mtp.*` tensors loads with `num_nextn_predict_layers = 0` (the model has no MTP block).

    Tensors are streamed one by one onto `device` into a model built on the meta device, so peak
    memory is about the final model plus one tensor. Parameters that the official release keeps in
    fp32 (`keeps_fp32`) stay fp32; the others get `dtype` (also the activation dtype); `tid2eid` stays
    int64.

    quantized: keep FP8 matrices and FP4 routed experts in their storage format (`dsv4.quant.FP8Linear`,
    `FP4Experts`; Triton kernels on CUDA), about a quarter of the bf16 bytes for the released models;
    `wo_a` stays FP8 too (the official inference code dequantises it). False: dequantise everything on load.
    Default: quantised when the checkpoint stores FP8/FP4 tensors and `device` is CUDA.
    experts: load only these routed experts of every MoE (a `range`; expert parallelism, see
    `dsv4.parallel.inference`); the MoE modules then hold `len(experts)` experts.

    strict: a missing, unexpected, mis-shaped or wrongly typed tensor raises one `CheckpointError`
    listing them all (checked from the file headers before any weight is read). With strict=False
    they are skipped with a warning; missing tensors get the training initialisation
    (`Transformer.init_weights`), missing routed experts are zero.
    progress: a tqdm bar over tensors; by default shown for more than 300 tensors.
    """
    from tqdm import tqdm

    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    device = torch.device(device)
    with open_checkpoint(path) as ckpt:
        ckpt.check(strict)
        _check_expert_range(experts, ckpt.cfg)
        resident = _make_resident(ckpt, device, quantized, experts)
        model = ckpt.model
        targets = model.state_dict(keep_vars=True)
        stacks: dict[str, torch.Tensor] = {}
        loaded: set[str] = set()
        show = progress if progress is not None else len(ckpt.items) > PROGRESS_MIN_TENSORS
        for item in tqdm(ckpt.items, desc=f"loading {ckpt.path.name}", unit="tensor", disable=not show):
            if experts is not None and any(e is not None and e not in experts for _, e, _ in item.targets):
                continue                                      # another rank's expert: never read
            raw, scale = ckpt.read(item, device)
            for name, expert, rows in item.targets:
                loaded.add(name)
                if name in resident:                          # stored bytes and scales kept as they are
                    scale_name = resident[name]
                    loaded.add(scale_name)
                    values = {name: raw.view(torch.int8) if item.fmt == "fp4" else raw,
                              scale_name: _resident_scale(item, scale, targets[scale_name].dtype)}
                else:
                    value = _decode(item, raw, scale, ckpt.block, _target_dtype(name, targets[name], dtype))
                    if rows is not None:
                        value = value[:, rows]
                    if expert is None and experts is not None and name.endswith(EXPERT_STACKS):
                        value = value[experts.start:experts.stop]     # transformers' stacked experts
                    values = {name: value}
                for key, value in values.items():
                    if expert is None:
                        _assign(model, key, value.contiguous())
                        continue
                    if key not in stacks:
                        stacks[key] = torch.empty(targets[key].shape, dtype=value.dtype, device=device)
                        _assign(model, key, stacks[key])
                    stacks[key][expert - (experts.start if experts is not None else 0)] = value
            del raw, scale
    missing = [n for n in model.state_dict(keep_vars=True) if n not in loaded]
    if missing:
        _init_missing(model, missing, device, dtype)
    for module in model.modules():   # non-persistent buffers (RoPE frequencies) were built on the CPU
        for k, b in module._buffers.items():
            if b is not None and b.device != device:
                module._buffers[k] = b.to(device)
    return model.eval()


def _check_expert_range(experts: range | None, cfg: ModelConfig) -> None:
    if experts is None:
        return
    E = cfg.n_routed_experts
    if not isinstance(experts, range) or experts.step != 1 or not 0 <= experts.start < experts.stop <= E:
        raise ValueError(f"experts must be a range(start, stop) of consecutive expert ids inside [0, {E}) with at "
                         f"least one expert; got {experts!r}")


def _make_resident(ckpt: _Checkpoint, device: torch.device, quantized: bool | None,
                   experts: range | None) -> dict[str, str]:
    """Decide what stays quantised and swap `FP8Linear` / `FP4Experts` into the meta model.

    Returns {weight name: scale name} of the tensors loaded as stored. FP8 matrices become `FP8Linear`
    (`wo_a` too: the attention runs it through `FP8Linear.grouped`, where the official code dequantises
    it on load); an MoE's experts become `FP4Experts` when all 3·E of them are stored FP4."""
    stored = [item for item in ckpt.items if item.fmt in ("fp8", "fp4")]
    if quantized is None:
        quantized = bool(stored) and device.type == "cuda"
    if quantized and not stored:
        raise ValueError(f"{ckpt.path} stores no FP8/FP4 tensors, so nothing can stay quantised: load it with "
                         "quantized=False, or convert it first (dsv4 convert SRC DST --fp8 --fp4-experts)")
    model = ckpt.model
    fp8: dict[str, torch.dtype] = {}
    fp4_count: dict[str, int] = {}
    for item in stored if quantized else ():
        name, expert, rows = item.targets[0]
        owner = name.rpartition(".")[0]
        if item.fmt == "fp8" and expert is None and name.endswith(".weight") \
                and isinstance(model.get_submodule(owner), nn.Linear):
            fp8[owner] = torch.float8_e8m0fnu if _scale_dtype(ckpt, item) == "F8_E8M0" else torch.float32
        elif item.fmt == "fp4" and expert is not None:
            fp4_count[owner] = fp4_count.get(owner, 0) + 1
    fp4 = [m for m, n in fp4_count.items() if n == 3 * ckpt.cfg.n_routed_experts]
    quant.replace_modules(model, fp8, fp4, n_experts=None if experts is None else len(experts))
    resident = {f"{m}.weight": f"{m}.scale" for m in fp8}
    resident.update({f"{m}.{w}": f"{m}.{w}_scale" for m in fp4 for w in ("w1", "w2", "w3")})
    return resident


def _scale_dtype(ckpt: _Checkpoint, item: _Item) -> str:
    return ckpt.handles[ckpt.where[item.scale_key]].get_slice(item.scale_key).get_dtype()


def _resident_scale(item: _Item, scale: torch.Tensor, want: torch.dtype) -> torch.Tensor:
    """A stored block scale in the dtype its module keeps (e8m0, or fp32 for FP8 weights stored with
    non-e8m0 scales); a scale that e8m0 cannot hold exactly is an error."""
    if scale.dtype == want:
        return scale
    if want == torch.float32:
        return scale.float()
    as_e8m0 = scale.float().to(torch.float8_e8m0fnu)
    if not torch.equal(as_e8m0.float(), scale.float()):
        raise CheckpointError(f"{item.scale_key}: FP4 block scales must be powers of two (e8m0) to stay quantised; "
                              "load with quantized=False to dequantise instead")
    return as_e8m0


# ----------------------------------------------------------------------------- writing
def _fp8_matrix(name: str) -> bool:
    return any(name == s or name.endswith("." + s) for s in FP8_MATRICES)


@dataclass
class _Group:
    """Tensors written together (a weight and its scale): their bytes and a producer of {file name: tensor}."""
    nbytes: int
    make: object


def _group(official: str, get, shape, out_dtype: torch.dtype, fp8: bool, fp4_experts: bool, layout: str) -> _Group:
    """How one tensor is written: name in `layout`, format (FP8 / FP4 / plain `out_dtype`) and size.
    `get()` returns the tensor on any device; quantisation runs there."""
    key = official if layout == "official" else (official_to_transformers(official) or official)
    skey = key[: -len("weight")] + ("scale" if layout == "official" else "weight_scale_inv")
    numel = math.prod(shape)
    if fp4_experts and _EXPERT_RX.match(official):
        nb = numel // 2 + shape[0] * math.ceil(shape[1] / quant.FP4_BLOCK)
        return _Group(nb, lambda: {k: v.cpu() for k, v in zip((key, skey), quant.quant_fp4(get().float()))})
    if fp8 and _fp8_matrix(official):
        nb = numel + math.ceil(shape[0] / 128) * math.ceil(shape[1] / 128)
        return _Group(nb, lambda: {k: v.cpu() for k, v in zip((key, skey), quant.quant_fp8(get().float()))})
    size = torch.empty((), dtype=out_dtype).element_size()
    return _Group(numel * size, lambda: {key: get().to("cpu", out_dtype).contiguous()})


def _out_dtype(name: str, floating: bool, dtype: torch.dtype) -> torch.dtype:
    if not floating:
        return torch.int64
    return torch.float32 if keeps_fp32(name) else dtype


def _model_groups(model: Transformer, dtype, fp8, fp4_experts, layout) -> list[_Group]:
    groups = []
    for name, t in model.state_dict().items():
        want = _out_dtype(name, t.is_floating_point(), dtype)
        if name.endswith(EXPERT_STACKS):
            for e in range(t.shape[0]):
                groups.append(_group(ours_to_official(name, e), lambda t=t, e=e: t[e].detach(), t.shape[1:],
                                     want, fp8, fp4_experts, layout))
        else:
            groups.append(_group(name, lambda t=t: t.detach(), t.shape, want, fp8, fp4_experts, layout))
    return groups


def _checkpoint_groups(ckpt: _Checkpoint, dtype, fp8, fp4_experts, layout) -> list[_Group]:
    """The tensors of an opened checkpoint, decoded one at a time when their shard is written."""
    last: dict[str, torch.Tensor] = {}

    def decoded(item: _Item) -> torch.Tensor:   # keep the last one: a stacked tensor feeds E experts
        if item.key not in last:
            last.clear()
            raw, scale = ckpt.read(item, "cpu")
            last[item.key] = _decode(item, raw, scale, ckpt.block,
                                     raw.dtype if item.fmt == "plain" else torch.float32)
        return last[item.key]

    expected = ckpt.model.state_dict(keep_vars=True)
    groups = []
    for item in ckpt.items:
        for name, expert, rows in item.targets:
            t = expected[name]
            want = _out_dtype(name, t.is_floating_point(), dtype)
            stacked = expert is None and name.endswith(EXPERT_STACKS)   # transformers' [E, ...] tensors
            for e in range(t.shape[0]) if stacked else [expert]:
                def get(item=item, e=e, rows=rows, stacked=stacked):
                    v = decoded(item)
                    v = v[e] if stacked else v
                    return v[rows] if rows is not None else v
                shape = t.shape[1:] if e is not None else t.shape
                groups.append(_group(ours_to_official(name, e), get, shape, want, fp8, fp4_experts, layout))
    return groups


def _check_save_args(path, layout, dtype, overwrite) -> Path:
    if layout not in ("official", "transformers"):
        raise ValueError(f"layout must be 'official' or 'transformers', got {layout!r}")
    if dtype not in (torch.bfloat16, torch.float32, torch.float16):
        raise ValueError(f"dtype must be torch.bfloat16, torch.float16 or torch.float32, got {dtype}")
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True to replace it")
    return path


def save_pretrained(model: Transformer, path: str | os.PathLike, *, fp8: bool = False, fp4_experts: bool = False,
                    dtype: torch.dtype = torch.bfloat16, max_shard_bytes: float = 5e9, layout: str = "official",
                    tokenizer_dir: str | os.PathLike | None = None, overwrite: bool = False,
                    progress: bool | None = None) -> Path:
    """Write `model` as a checkpoint folder: config.json, `model.safetensors.index.json` and shards.

    The dtypes follow the official release: `dtype` (bf16 by default; fp32 for an exact round trip) for
    matrices, embeddings and norms, fp32 for the `keeps_fp32` parameters, int64 `tid2eid`. `fp8=True`
    stores the matrices the release keeps in FP8 (`FP8_MATRICES`) as e4m3 with 128×128 e8m0 scales;
    `fp4_experts=True` stores the routed experts as packed e2m1 with 1×32 e8m0 scales (config.json then
    gets the release's `quantization_config` / `expert_dtype`). `layout="transformers"` uses the names
    transformers 5.17's own `save_pretrained` writes (block scales as `*.weight_scale_inv`); the MTP
    block, which transformers ignores, keeps its official names. The folder is written next to `path`
    under a temporary name and renamed into place when complete. Tokenizer files found in
    `tokenizer_dir` are copied.
    """
    path = _check_save_args(path, layout, dtype, overwrite)
    if any(isinstance(m, (quant.FP8Linear, quant.FP4Experts)) for m in model.modules()):
        raise ValueError("this model keeps FP8/FP4 weights resident (load_pretrained(quantized=True)); copy its "
                         "checkpoint folder instead, or load it with quantized=False to save it")
    groups = _model_groups(model, dtype, fp8, fp4_experts, layout)
    _write_folder(groups, model.config, path, fp8, fp4_experts, dtype, max_shard_bytes, tokenizer_dir, progress)
    return path


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, fp8: bool = False,
                       fp4_experts: bool = False, dtype: torch.dtype = torch.bfloat16, layout: str = "official",
                       max_shard_bytes: float = 5e9, overwrite: bool = False, progress: bool | None = None) -> Path:
    """Rewrite a checkpoint folder in another layout / precision, streaming tensor by tensor (peak memory
    about one output shard), without building the model. Same options as `save_pretrained`; tokenizer
    files of `src` are copied. The source is checked strictly first."""
    dst = _check_save_args(dst, layout, dtype, overwrite)
    with open_checkpoint(src) as ckpt:
        ckpt.check(strict=True)
        groups = _checkpoint_groups(ckpt, dtype, fp8, fp4_experts, layout)
        _write_folder(groups, ckpt.cfg, dst, fp8, fp4_experts, dtype, max_shard_bytes, ckpt.path, progress)
    return dst


def write_random_checkpoint(cfg: ModelConfig, path: str | os.PathLike, *, seed: int = 0,
                            device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                            fp8: bool | None = None, fp4_experts: bool | None = None, max_shard_bytes: float = 5e9,
                            overwrite: bool = False, progress: bool | None = None) -> Path:
    """Write a checkpoint of `cfg` with random weights in the official layout and formats, shard by shard.

    For benchmarks and tests at the released shapes: no model is built (names and shapes come from a
    meta-device model) and each tensor is drawn on `device` (a GPU is much faster for the quantisation),
    quantised there and written with its shard, so host memory peaks at about one shard. fp8 /
    fp4_experts default to the config's `quantization_config` / `expert_dtype`. Values follow the test
    recipe: matrices N(0, 1)/sqrt(fan_in) (expert and shared-expert w1/w3 ×3 so the SwiGLU clamp is
    reached), norms 1 + 0.1·N, mHC scales 0.5 + 0.5·U, mHC bases / sinks / ape 0.5·N, router bias 0.1·N,
    distinct random experts per token id for hash layers. Each tensor has its own generator seed, so the
    folder does not depend on the shard size."""
    fp8 = cfg.quantization_config is not None if fp8 is None else fp8
    fp4_experts = cfg.expert_dtype == "fp4" if fp4_experts is None else fp4_experts
    path = _check_save_args(path, "official", dtype, overwrite)
    device = torch.device(device)
    groups = []
    for i, (name, t) in enumerate(empty_model(cfg).state_dict().items()):
        want = _out_dtype(name, t.is_floating_point(), dtype)
        if name.endswith(EXPERT_STACKS):
            for e in range(t.shape[0]):
                get = lambda name=name, shape=t.shape[1:], s=(seed * 100_003 + i) * 4_099 + e: \
                    _random_tensor(name, shape, cfg, device, s)
                groups.append(_group(ours_to_official(name, e), get, t.shape[1:], want, fp8, fp4_experts, "official"))
        else:
            get = lambda name=name, shape=t.shape, s=(seed * 100_003 + i) * 4_099 + 4_098: \
                _random_tensor(name, shape, cfg, device, s)
            groups.append(_group(name, get, t.shape, want, fp8, fp4_experts, "official"))
    _write_folder(groups, cfg, path, fp8, fp4_experts, dtype, max_shard_bytes, None, progress)
    return path


def _random_tensor(name: str, shape, cfg: ModelConfig, device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    if name.endswith("tid2eid"):
        V, K = shape
        return torch.rand(V, cfg.n_routed_experts, generator=g, device=device).argsort(dim=-1)[:, :K]
    if name.endswith("_scale"):                                                # mHC gating factors
        return 0.5 + 0.5 * torch.rand(shape, generator=g, device=device)
    n = torch.randn(shape, generator=g, device=device)
    if name.endswith("norm.weight"):
        return 1 + 0.1 * n
    if name.endswith(("_base", "attn_sink", "ape")):
        return 0.5 * n
    if name.endswith("gate.bias"):
        return 0.1 * n
    gain = 3.0 if name.endswith(("experts.w1", "experts.w3", "shared_experts.w1.weight",
                                 "shared_experts.w3.weight")) else 1.0
    return n * (gain / shape[-1] ** 0.5)


def _write_folder(groups: list[_Group], cfg: ModelConfig, path: Path, fp8, fp4_experts, dtype, max_shard_bytes,
                  tokenizer_dir, progress) -> None:
    from safetensors.torch import save_file
    from tqdm import tqdm

    shards: list[list[_Group]] = [[]]
    size = 0
    for g in groups:
        if shards[-1] and size + g.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(g)
        size += g.nbytes
    n = len(shards)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())   # mkdtemp makes it 0700; the finished folder gets the usual mode
    show = progress if progress is not None else len(groups) > PROGRESS_MIN_TENSORS
    bar = tqdm(total=len(groups), desc=f"writing {path.name}", unit="tensor", disable=not show)
    try:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            tensors = {}
            for g in shard:
                tensors.update(g.make())
                bar.update()
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, fname))
            del tensors
        index = {"metadata": {"total_size": sum(g.nbytes for g in groups)}, "weight_map": weight_map}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(_config_dict(cfg, fp8, fp4_experts, dtype), indent=2) + "\n")
        if tokenizer_dir is not None:
            for f in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / f).is_file():
                    shutil.copy2(Path(tokenizer_dir) / f, tmp / f)
        for f in tmp.iterdir():   # safetensors writes its files 0600
            f.chmod(0o666 & ~_umask())
        _replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()


def _config_dict(cfg: ModelConfig, fp8: bool, fp4_experts: bool, dtype: torch.dtype) -> dict:
    d = cfg.to_hf_config()
    d.pop("quantization_config", None)
    d.pop("expert_dtype", None)
    if fp8 or fp4_experts:
        d["quantization_config"] = dict(FP8_QUANT_CONFIG)
    if fp4_experts:
        d["expert_dtype"] = "fp4"
    d["torch_dtype"] = str(dtype).removeprefix("torch.")
    return d


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _replace(tmp: Path, path: Path) -> None:
    """Move the finished folder `tmp` to `path`; an existing `path` is removed only after the move."""
    if not path.exists():
        os.replace(tmp, path)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.replace(path, old / "old")
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old / "old", path)
        raise
    shutil.rmtree(old, ignore_errors=True)
