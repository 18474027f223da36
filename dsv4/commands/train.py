"""`dsv4 train --recipe NAME --out DIR [--steps N] [--resume] [--device D] [key=value ...]`.

Runs a named recipe (`dsv4.recipes`) into a run directory (layout in docs/training.md). Overrides
change TrainConfig fields (`lr=1e-3`, `micro_batch=8`) or the model (`model.hidden_size=256`,
`model=small`). `--print` shows the resolved config and exits (the flash/pro recipes are for reading).
"""
from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default="tiny", help="tiny | small | flash | pro (default tiny)")
    p.add_argument("--out", help="run directory (created; holds metrics, checkpoints, the exported model)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides the recipe)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (overrides the recipe)")
    p.add_argument("--print", dest="print_only", action="store_true", help="print the resolved config and exit")
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
    from dsv4.train import train

    trainer = train(cfg, args.out, resume=args.resume, progress=not args.no_progress)
    if trainer.last_eval:
        print(f"final validation loss {trainer.last_eval['val_loss']:.4f} "
              f"(perplexity {trainer.last_eval['val_ppl']:.1f}); run directory {args.out}")
    return 0
