"""`dsv4 …` command line. This is the only module that reads argv.

Each subcommand lives in `dsv4/commands/<name>.py` and exposes `add_arguments(parser)` and
`run(args) -> int`. Modules are imported only when their command runs, so `dsv4 info` does not pay for
the server's imports. A command with an `overrides` argument takes `key=value` words anywhere on its
command line (before, between or after options). Errors a user can fix (bad arguments, missing or
corrupt files, bad config values) print one line naming the command, exit status 2, no traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys

_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")

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
    available, parsers = {}, {}
    for name, help_text in COMMANDS.items():
        try:
            module = _module(name)
        except ModuleNotFoundError as exc:  # a command whose module is not there yet
            if exc.name and exc.name.startswith("dsv4.commands"):
                continue
            raise
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        available[name], parsers[name] = module, p
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        parser.print_help()
        return 2
    if extra:   # key=value words after options (argparse takes only the first run of positionals)
        rest = [x for x in extra if not _OVERRIDE.match(x)]
        if rest or not hasattr(args, "overrides"):
            parsers[args.command].error(f"unrecognized arguments: {' '.join(rest or extra)}")
        args.overrides = list(args.overrides) + extra
    try:
        return int(available[args.command].run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not user_error(exc):
            raise
        print(f"dsv4 {args.command}: error: {exc}", file=sys.stderr)
        return 2


def cpu_threads() -> tuple[int, str]:
    """A CPU thread count for this machine as it is now, and a line saying why: OMP_NUM_THREADS if
    set, else the cores this process may run on minus one per whole unit of load average (others'
    work), at least one. Oversubscribed cores make PyTorch's CPU kernels much slower, not faster."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env), f"{env} CPU threads (OMP_NUM_THREADS)"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        load = 0.0
    n = max(1, min(cores, cores - int(load)))
    return n, f"{n} CPU thread{'s' if n > 1 else ''} ({cores} cores, load average {load:.1f}; " \
              "set OMP_NUM_THREADS to choose)"


def user_error(exc: BaseException) -> bool:
    """Errors whose message tells the user what to fix: argument and value errors, files that are
    missing or unreadable, and the RuntimeErrors dsv4 raises on purpose (a checkpoint that fails its
    checksums, a diverged run)."""
    if isinstance(exc, (CLIError, OSError, ValueError)):
        return True
    return isinstance(exc, RuntimeError) and type(exc).__module__.startswith("dsv4.")


if __name__ == "__main__":
    raise SystemExit(main())
