"""`dsv4 train --recipe NAME --out DIR [--steps N] [--resume] [--device D] [key=value ...]`.

Runs a named recipe (`dsv4.recipes`) into a run directory (layout in docs/training.md). Overrides
change TrainConfig fields (`lr=1e-3`, `micro_batch=8`) or the model (`model.hidden_size=256`,
`model=small`). `--print` shows the resolved config and exits (the flash/pro recipes are for reading).
`--export` writes DIR/model from the newest checkpoint (of any run layout) and exits.

Several processes: `torchrun --nproc_per_node=N -m dsv4 train ...` (one GPU per process with NCCL, or
gloo on CPU); `dp_replicate=` and `ep=` choose the layout (docs/training.md, "Several processes").
"""
from __future__ import annotations

import argparse
import dataclasses
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default="tiny", help="tiny | small | flash | pro (default tiny)")
    p.add_argument("--out", help="run directory (created; holds metrics, checkpoints, the exported model)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides the recipe)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (overrides the recipe)")
    p.add_argument("--print", dest="print_only", action="store_true", help="print the resolved config and exit")
    p.add_argument("--export", action="store_true",
                   help="write OUT/model from the newest checkpoint in --out (any number of processes wrote it) and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="TrainConfig / model.* field overrides")


def resolve_config(args: argparse.Namespace):
    from dsv4.recipes import get_recipe

    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    if args.device is not None:
        overrides.append(f"device={args.device}")
    return get_recipe(args.recipe).with_overrides(overrides)


def run(args: argparse.Namespace) -> int:
    from dsv4.cli import CLIError

    cfg = resolve_config(args)
    if args.print_only:
        counts = cfg.model.param_counts()
        print(json.dumps(cfg.to_dict(), indent=2, default=str))
        print(f"# parameters: {counts['total'] / 1e6:.1f}M total, {counts['total_with_mtp'] / 1e6:.1f}M with MTP, "
              f"{counts['active'] / 1e6:.1f}M active per token")
        return 0
    if not args.out:
        raise CLIError("--out DIR is required to train (or pass --print to show the config)")
    if args.export:
        return _export(args.out, cfg)
    from dsv4.parallel.launch import init_from_torchrun, shutdown
    from dsv4.train import train

    device = init_from_torchrun(cfg.device)
    if device is not None:                  # under torchrun: this process's GPU (or the CPU with gloo)
        cfg = dataclasses.replace(cfg, device=device)
    try:
        trainer = train(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    finally:
        shutdown()
    if trainer.last_eval and trainer.is_main:
        print(f"final validation loss {trainer.last_eval['val_loss']:.4f} "
              f"(perplexity {trainer.last_eval['val_ppl']:.1f}); run directory {args.out}")
    return 0


def _export(out: str, cfg) -> int:
    from pathlib import Path

    import torch

    from dsv4 import runlog
    from dsv4.cli import CLIError
    from dsv4.train import export_checkpoint

    run = Path(out)
    ckpt = runlog.latest_checkpoint(run / "checkpoints")
    if ckpt is None:
        raise CLIError(f"no complete checkpoint in {run / 'checkpoints'}")
    tok = run / "tokenizer"
    path = export_checkpoint(ckpt, run / "model", dtype=torch.float32 if cfg.export_dtype == "fp32" else torch.bfloat16,
                             tokenizer_dir=tok if tok.is_dir() else None)
    print(f"exported {ckpt} to {path}")
    return 0
