"""`dsv4 plot RUN_DIR [--out DIR]`: PNGs of a training run (loss, lr, aux losses, expert load, tokens/s)."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run directory (holds metrics.jsonl)")
    p.add_argument("--out", default=None, help="where to write the PNGs (default RUN_DIR/plots)")


def run(args: argparse.Namespace) -> int:
    from dsv4.plot import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0
