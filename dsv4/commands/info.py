"""`dsv4 info PATH|PRESET`: layer pattern, parameter counts and KV-cache bytes of a model.

Reads only config.json and the safetensors headers, so it is instant even for the released models.
KV bytes follow `dsv4.cache.cache_bytes` (spec §12.3): the compressed entries grow with the context,
the window rings and compressor states are a fixed amount per sequence. Weight memory follows
`dsv4.quant.analytic_resident_bytes`: quantised-resident (`load_pretrained(quantized=True)`, FP8 / FP4
kept as stored) and dequantised on load, whole or per rank of expert parallelism.
"""
from __future__ import annotations

import argparse
from pathlib import Path

ABBREV = {"sliding_attention": "SWA", "compressed_sparse_attention": "CSA", "heavily_compressed_attention": "HCA"}
PER_LINE = 8


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="PATH", nargs="?", help="checkpoint folder (or its config.json), or a preset "
                                                            "name such as deepseek-v4-flash")
    p.add_argument("--backends", action="store_true",
                   help="print which implementation (PyTorch twin or Triton kernel) each primitive uses per device "
                        "(override with DSV4_OPS, e.g. DSV4_OPS=torch or DSV4_OPS=sparse_attention=torch)")
    p.add_argument("--context", type=int, default=None, metavar="N",
                   help="context length for the KV-cache figures (default: max_position_embeddings)")
    p.add_argument("--batch", type=int, default=1, metavar="B", help="sequences held in the cache (default 1)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                   help="model dtype for the weight-memory figures (default bf16)")
    p.add_argument("--expert-parallel", type=int, default=1, metavar="W",
                   help="also give the weight memory per rank when the routed experts are split over W ranks")


def human_count(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def human_bytes(n: float) -> str:
    for unit, div in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def resolve(model: str):
    """(ModelConfig, folder or None, description) for a folder, a config.json path or a preset name."""
    from dsv4.checkpoint import read_config
    from dsv4.cli import CLIError
    from dsv4.config import PRESETS, ModelConfig, preset

    path = Path(model)
    if path.is_file() and path.name.endswith(".json"):
        return ModelConfig.from_json(path), None, f"{path}"
    if path.is_dir():
        return read_config(path), path, f"{path}"
    if model in PRESETS:
        return preset(model), None, f"preset {model}"
    raise CLIError(f"{model!r} is neither a folder, a config.json nor a preset name "
                   f"(presets: {', '.join(PRESETS)})")


def layer_lines(cfg) -> list[str]:
    cells = []
    for i in range(cfg.num_hidden_layers):
        cells.append(ABBREV[cfg.layer_type(i)] + ("*" if i < cfg.num_hash_layers else " "))
    lines = []
    for a in range(0, len(cells), PER_LINE):
        b = min(a + PER_LINE, len(cells)) - 1
        lines.append(f"  {f'{a}-{b}':>7}  " + " ".join(cells[a:b + 1]))
    for k in range(cfg.num_nextn_predict_layers):
        lines.append(f"  {f'MTP {k}':>7}  {ABBREV[cfg.layer_type(cfg.num_hidden_layers + k)]}")
    return lines


def storage_lines(folder: Path) -> list[str]:
    """Shards, bytes on disk and tensors per storage dtype, from the safetensors headers."""
    import contextlib
    from collections import Counter

    from dsv4.checkpoint import CheckpointError, open_shard, weight_files

    names = {"F8_E4M3": "FP8 e4m3", "I8": "FP4 e2m1 (packed)", "F8_E8M0": "e8m0 scales"}
    counts: Counter = Counter()
    try:
        files, _ = weight_files(folder)
        for f in files:
            with contextlib.ExitStack() as stack:
                h = open_shard(f, stack)
                counts.update(h.get_slice(k).get_dtype() for k in h.keys())
    except FileNotFoundError:
        return ["weights: none in this folder (config only)"]
    except CheckpointError as exc:
        return [f"weights: unreadable: {exc}"]
    size = sum(f.stat().st_size for f in files)
    kinds = ", ".join(f"{names.get(d, d)} {n}" for d, n in counts.most_common())
    return [f"weights: {len(files)} file(s), {human_bytes(size)}, {sum(counts.values())} tensors ({kinds})"]


def stored_formats(folder: Path | None, cfg) -> tuple[bool, bool]:
    """(FP8 matrices, FP4 experts) as stored: from the safetensors headers of a folder, else the config."""
    import contextlib

    from dsv4.checkpoint import CheckpointError, open_shard, weight_files

    if folder is not None:
        try:
            files, _ = weight_files(folder)
            fp8 = fp4 = False
            for f in files:
                with contextlib.ExitStack() as stack:
                    h = open_shard(f, stack)
                    for k in h.keys():
                        d = h.get_slice(k).get_dtype()
                        fp8 |= d == "F8_E4M3"
                        fp4 |= d in ("I8", "U8") and ".ffn.experts." in k and k.endswith(".weight")
            return fp8, fp4
        except (FileNotFoundError, CheckpointError):
            pass
    return cfg.quantization_config is not None, cfg.expert_dtype == "fp4"


def memory_lines(cfg, folder: Path | None, dtype_name: str, ranks: int) -> list[str]:
    """Resident weight bytes: quantised as stored, and dequantised on load; per rank with expert parallelism."""
    import torch

    from dsv4.parallel.inference import expert_range
    from dsv4.quant import analytic_resident_bytes

    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    fp8, fp4 = stored_formats(folder, cfg)
    lines = []
    if fp8 or fp4:
        q = analytic_resident_bytes(cfg, dtype, fp8=fp8, fp4_experts=fp4)
        lines.append(f"weights in memory, quantised-resident ({dtype_name}, as load_pretrained(quantized=True) holds "
                     f"them): {human_bytes(q['total'])} ({q['total']:,} B = FP8 {human_bytes(q['fp8'])}, FP4 experts "
                     f"{human_bytes(q['fp4'])}, block scales {human_bytes(q['scales'])}, other "
                     f"{human_bytes(q['other'])})")
    d = analytic_resident_bytes(cfg, dtype, fp8=False, fp4_experts=False)
    lines.append(f"weights in memory, dequantised on load ({dtype_name}): {human_bytes(d['total'])} ({d['total']:,} B)")
    if ranks > 1:
        n = len(expert_range(cfg.n_routed_experts, 0, ranks))     # rank 0 holds the most experts
        per = analytic_resident_bytes(cfg, dtype, fp8=fp8, fp4_experts=fp4, n_experts=n)["total"]
        lines.append(f"  with the routed experts split over {ranks} ranks (expert parallelism): {human_bytes(per)} "
                     f"per rank ({n} experts per MoE{', quantised' if fp8 or fp4 else ''})")
    return lines


def run(args: argparse.Namespace) -> int:
    from dsv4.cache import cache_bytes
    from dsv4.cli import CLIError

    if args.backends:
        from dsv4 import ops
        print("kernel-backed primitives (dsv4.ops):\n" + ops.describe_backends())
        if args.model is None:
            return 0
        print()
    if args.model is None:
        raise CLIError("info needs a checkpoint folder, config.json or preset name (or --backends)")
    cfg, folder, what = resolve(args.model)
    N = args.context if args.context is not None else cfg.max_position_embeddings
    if N <= 0 or args.batch <= 0 or args.expert_parallel <= 0:
        raise CLIError("--context, --batch and --expert-parallel must be positive")
    if args.expert_parallel > cfg.n_routed_experts:
        raise CLIError(f"--expert-parallel {args.expert_parallel} exceeds the {cfg.n_routed_experts} routed experts")
    L = cfg.num_hidden_layers
    types = cfg.layer_types
    out = [f"DeepSeek-V4 model: {what}",
           f"shape: {L} layers + {cfg.num_nextn_predict_layers} MTP block(s), hidden {cfg.hidden_size}, "
           f"{cfg.num_attention_heads} heads x {cfg.head_dim} (rope {cfg.qk_rope_head_dim}), vocab {cfg.vocab_size}, "
           f"window {cfg.sliding_window}, mHC streams {cfg.hc_mult}",
           f"MoE: {cfg.n_routed_experts} routed experts ({cfg.num_experts_per_tok} per token) + "
           f"{cfg.n_shared_experts} shared, intermediate {cfg.moe_intermediate_size}; hash-routed layers: "
           + ("none" if not cfg.num_hash_layers else "0" if cfg.num_hash_layers == 1 else
              f"0-{cfg.num_hash_layers - 1}"),
           f"layer pattern (SWA sliding window, CSA 1:4 + top-{cfg.index_topk} indexer, HCA 1:"
           + "/".join(str(r) for r in sorted(set(cfg.compress_ratios) - {0, 4}) or ["128"])
           + "; * = hash-routed MoE):"]
    out += layer_lines(cfg)
    out.append("  counts: " + ", ".join(f"{ABBREV[t]} {types.count(t)}" for t in ABBREV if types.count(t)))
    pc = cfg.param_counts()
    out.append(f"parameters: total {human_count(pc['total'])} ({pc['total']:,}), with MTP "
               f"{human_count(pc['total_with_mtp'])}; active per token {human_count(pc['active'])} "
               f"({pc['active']:,}, without the embedding)")
    kv = cache_bytes(cfg, N)
    fixed = cache_bytes(cfg, 0)["total"]           # window rings + compressor state: independent of N
    per_tok = kv["per_token_per_type"]
    out.append(f"KV cache (BF16, as allocated by dsv4.cache) at context {N:,} tokens:")
    out.append(f"  per token: {kv['per_token']:,.0f} B of compressed entries ("
               + ", ".join(f"{ABBREV[t]} {b:,.0f} B" for t, b in per_tok.items() if b) + ")")
    out.append(f"  per sequence: {human_bytes(kv['total'])} ({kv['total']:,} B = compressed entries "
               f"{human_bytes(kv['total'] - fixed)} + window rings and compressor state {human_bytes(fixed)})")
    if args.batch > 1:
        out.append(f"  batch of {args.batch}: {human_bytes(args.batch * kv['total'])}")
    try:
        kv8 = cache_bytes(cfg, N, kv_fp8=True)
        out.append(f"  with --kv-cache fp8 (main compressed entries as FP8 rows): {human_bytes(kv8['total'])} per "
                   f"sequence, {kv8['per_token']:,.0f} B per token")
    except ValueError:                             # head_dim − rope dims not a multiple of 64
        out.append("  --kv-cache fp8: not available for this head_dim / rope dims")
    out += memory_lines(cfg, folder, args.dtype, args.expert_parallel)
    if folder is not None:
        out += storage_lines(folder)
    print("\n".join(out))
    return 0
