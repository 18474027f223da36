"""`dsv4 convert SRC DST`: rewrite a checkpoint folder in another precision or naming layout.

Streams tensor by tensor (`dsv4.checkpoint.convert_checkpoint`), so converting the released models
needs about one output shard of memory, not the model. Examples:

    dsv4 convert ./DeepSeek-V4-Flash ./flash-bf16                      # FP8/FP4 -> bf16
    dsv4 convert ./flash-bf16 ./flash-fp8 --fp8 --fp4-experts          # back to the release's formats
    dsv4 convert ./DeepSeek-V4-Flash ./flash-hf --layout transformers  # transformers' names
"""
from __future__ import annotations

import argparse

DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="checkpoint folder (official or transformers layout)")
    p.add_argument("dst", metavar="DST", help="output folder (written atomically)")
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


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from dsv4.checkpoint import convert_checkpoint
    from dsv4.cli import CLIError

    src, dst = Path(args.src), Path(args.dst)
    if not src.is_dir():
        raise CLIError(f"SRC {src} is not a folder")
    if dst.exists() and src.resolve() == dst.resolve():
        raise CLIError("SRC and DST are the same folder; write to a new folder")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not args.overwrite:
        raise CLIError(f"DST {dst} exists and is not empty; pass --overwrite to replace it")
    if args.max_shard_gb <= 0:
        raise CLIError("--max-shard-gb must be positive")
    convert_checkpoint(src, dst, fp8=args.fp8, fp4_experts=args.fp4_experts, dtype=getattr(torch, DTYPES[args.dtype]),
                       layout=args.layout, max_shard_bytes=args.max_shard_gb * 1e9, overwrite=args.overwrite)
    parts = [args.layout + " layout", args.dtype] + (["FP8"] if args.fp8 else []) + \
            (["FP4 experts"] if args.fp4_experts else [])
    print(f"wrote {dst} ({', '.join(parts)})")
    return 0
