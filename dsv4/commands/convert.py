"""`dsv4 convert SRC DST`: rewrite a checkpoint folder in another precision or naming layout;
`dsv4 convert --random-like PRESET DST`: write a random checkpoint at a released model's shapes.

Both stream tensor by tensor (`dsv4.checkpoint.convert_checkpoint`, `write_random_checkpoint`), so
they need about one output shard of memory, never the model. Examples:

    dsv4 convert ./DeepSeek-V4-Flash ./flash-bf16                      # FP8/FP4 -> bf16
    dsv4 convert ./flash-bf16 ./flash-fp8 --fp8 --fp4-experts          # back to the release's formats
    dsv4 convert ./DeepSeek-V4-Flash ./flash-hf --layout transformers  # transformers' names
    dsv4 convert --random-like deepseek-v4-flash --layers 4 ./flash4   # V4-Flash shapes, 4 layers, FP8/FP4
"""
from __future__ import annotations

import argparse

DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", nargs="?", help="checkpoint folder (official or transformers layout); "
                                                         "omitted with --random-like")
    p.add_argument("dst", metavar="DST", nargs="?", help="output folder (written atomically)")
    p.add_argument("--fp8", action="store_true",
                   help="store the matrices the release keeps in FP8 as e4m3 with 128x128 e8m0 block scales")
    p.add_argument("--fp4-experts", action="store_true",
                   help="store the routed experts as packed FP4 e2m1 with 1x32 e8m0 scales")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                   help="dtype of the unquantised tensors (fp32 ones such as mHC and sinks stay fp32); default bf16")
    p.add_argument("--layout", choices=("official", "transformers"), default="official",
                   help="tensor names: the official release's, or the ones transformers' save_pretrained writes")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="largest shard size in GB (default 5)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    r = p.add_argument_group("random checkpoints (--random-like)")
    r.add_argument("--random-like", metavar="PRESET", default=None,
                   help="write random weights with a preset's shapes and storage formats (deepseek-v4-flash: FP8 "
                        "matrices, FP4 experts; --fp8 / --fp4-experts add them to other presets) instead of "
                        "converting SRC")
    r.add_argument("--layers", type=int, default=None, metavar="K", help="main layers (default: the preset's)")
    r.add_argument("--mtp", type=int, default=None, metavar="N", help="MTP blocks (default: the preset's)")
    r.add_argument("--experts", type=int, default=None, metavar="E", help="routed experts per MoE (default: "
                                                                          "the preset's)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default=None, help="where tensors are drawn and quantised (default: cuda when "
                                                  "available, else cpu)")


def random_like_config(name: str, layers: int | None = None, mtp: int | None = None, experts: int | None = None):
    """A preset's config with K main layers (its first K layer types), N MTP blocks and E routed experts."""
    from dsv4.config import preset

    cfg = preset(name)
    L = cfg.num_hidden_layers
    K = L if layers is None else layers
    n_mtp = cfg.num_nextn_predict_layers if mtp is None else mtp
    E = cfg.n_routed_experts if experts is None else experts
    if K < 1 or n_mtp < 0 or E < cfg.num_experts_per_tok:
        raise ValueError(f"--layers must be >= 1, --mtp >= 0 and --experts >= {cfg.num_experts_per_tok} (experts "
                         f"per token); got {K}, {n_mtp}, {E}")
    main = [cfg.layer_ratio(i % L) for i in range(K)]
    return cfg.with_(num_hidden_layers=K, num_nextn_predict_layers=n_mtp, n_routed_experts=E,
                     num_hash_layers=min(cfg.num_hash_layers, K),
                     compress_ratios=tuple(main + [cfg.layer_ratio(L + k) for k in range(n_mtp)]))


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from dsv4.checkpoint import convert_checkpoint, write_random_checkpoint
    from dsv4.cli import CLIError

    if args.max_shard_gb <= 0:
        raise CLIError("--max-shard-gb must be positive")
    dtype = getattr(torch, DTYPES[args.dtype])
    if args.random_like is not None:
        if args.dst is not None or args.src is None:
            raise CLIError("with --random-like give only the output folder: dsv4 convert --random-like PRESET DST")
        dst = Path(args.src)
        if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not args.overwrite:
            raise CLIError(f"DST {dst} exists and is not empty; pass --overwrite to replace it")
        if args.layout != "official":
            raise CLIError("--random-like writes the official layout; convert the result for another layout")
        cfg = random_like_config(args.random_like, args.layers, args.mtp, args.experts)
        fp8 = args.fp8 or cfg.quantization_config is not None
        fp4 = args.fp4_experts or cfg.expert_dtype == "fp4"
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        write_random_checkpoint(cfg, dst, seed=args.seed, device=device, dtype=dtype, fp8=fp8, fp4_experts=fp4,
                                max_shard_bytes=args.max_shard_gb * 1e9, overwrite=args.overwrite)
        formats = (["FP8"] if fp8 else []) + (["FP4 experts"] if fp4 else [])
        print(f"wrote {dst} (random {args.random_like}: {cfg.num_hidden_layers} layers, {cfg.num_nextn_predict_layers} "
              f"MTP, {cfg.n_routed_experts} experts; {', '.join([args.dtype] + formats)})")
        return 0
    if any(v is not None for v in (args.layers, args.mtp, args.experts)):
        raise CLIError("--layers, --mtp and --experts apply to --random-like only")
    if args.src is None or args.dst is None:
        raise CLIError("give SRC and DST folders (or --random-like PRESET DST)")
    src, dst = Path(args.src), Path(args.dst)
    if not src.is_dir():
        raise CLIError(f"SRC {src} is not a folder")
    if dst.exists() and src.resolve() == dst.resolve():
        raise CLIError("SRC and DST are the same folder; write to a new folder")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not args.overwrite:
        raise CLIError(f"DST {dst} exists and is not empty; pass --overwrite to replace it")
    convert_checkpoint(src, dst, fp8=args.fp8, fp4_experts=args.fp4_experts, dtype=dtype,
                       layout=args.layout, max_shard_bytes=args.max_shard_gb * 1e9, overwrite=args.overwrite)
    parts = [args.layout + " layout", args.dtype] + (["FP8"] if args.fp8 else []) + \
            (["FP4 experts"] if args.fp4_experts else [])
    print(f"wrote {dst} ({', '.join(parts)})")
    return 0
