"""`dsv4 …` command line. This is the only module that reads argv.

Each subcommand lives in `dsv4/commands/<name>.py` and exposes `add_arguments(parser)` and
`run(args) -> int`. Modules are imported only when their command runs, so `dsv4 info` does not pay for
the server's imports.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "info": "print a checkpoint's layer pattern, parameter counts and KV-cache bytes",
    "convert": "convert a checkpoint between official/transformers layouts and bf16/FP8/FP4",
    "train": "train a V4-architecture model from a named recipe",
    "plot": "write PNG plots of a training run",
    "demo": "train the tiny recipe on the bundled corpus and sample from it",
    "generate": "continue a prompt with a model",
    "chat": "interactive chat in the DeepSeek-V4 chat format",
    "serve": "OpenAI-compatible HTTP server",
    "flops": "per-token inference FLOPs by term at any context, and the ratio to DeepSeek-V3.2",
    "kv": "KV-cache bytes per sequence at any context, and the ratio to DeepSeek-V3.2",
}


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2, no traceback."""


def _module(name: str):
    return importlib.import_module(f"dsv4.commands.{name}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="dsv4", description="DeepSeek-V4 in plain PyTorch")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    available = {}
    for name, help_text in COMMANDS.items():
        try:
            module = _module(name)
        except ModuleNotFoundError as exc:  # a command whose module is not there yet
            if exc.name and exc.name.startswith("dsv4.commands"):
                continue
            raise
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        available[name] = module
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(available[args.command].run(args) or 0)
    except (CLIError, FileNotFoundError, ValueError) as exc:
        print(f"dsv4 {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
