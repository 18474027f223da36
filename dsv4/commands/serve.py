"""`dsv4 serve --model DIR`: OpenAI-compatible HTTP server (see dsv4/server.py and docs/serving.md)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from dsv4.commands.generate import add_model_arguments, engine_options, load


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, metavar="N", help="sequences decoded together (cache rows)")
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests waiting for a free row before new ones get 429")
    p.add_argument("--max-len", type=int, default=4096, metavar="N", help="context per sequence (prompt + output)")
    p.add_argument("--served-model-name", default=None, help="model id reported by /v1/models")
    p.add_argument("--api-key", default=os.environ.get("DSV4_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' (default: $DSV4_API_KEY; none: no authentication)")
    p.add_argument("--max-request-bytes", type=int, default=16 << 20, metavar="N",
                   help="largest request body; larger ones get 413 (default 16 MiB)")
    p.add_argument("--request-timeout", type=float, default=None, metavar="S",
                   help="cancel a request that has not finished after S seconds (504); default: no limit")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM/Ctrl-C, let running requests finish for up to S seconds (default 30)")
    p.add_argument("--stall-timeout", type=float, default=300.0, metavar="S",
                   help="/health reports the engine stalled when one step runs longer (default 300)")
    p.add_argument("--prefix-cache-mb", type=int, default=1024, metavar="MB",
                   help="memory for prefix-cache snapshots on the model's device (0: off; default 1024)")


def run(args) -> int:
    from pathlib import Path

    import uvicorn

    from dsv4.cli import CLIError
    from dsv4.engine import Engine
    from dsv4.runlog import describe_environment
    from dsv4.server import create_app

    for name in ("max_batch", "max_queue", "max_len", "max_request_bytes"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("request_timeout", "drain_timeout", "stall_timeout"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise CLIError(f"--{name.replace('_', '-')} must be positive")
    if args.prefix_cache_mb < 0:
        raise CLIError("--prefix-cache-mb must be >= 0")
    if args.api_key is not None and not args.api_key.strip():
        raise CLIError("--api-key is empty")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    model, tokenizer = load(args)
    engine = Engine(model, tokenizer, max_batch=args.max_batch, max_len=args.max_len, max_queue=args.max_queue,
                    prefix_cache_bytes=args.prefix_cache_mb << 20, **engine_options(args))
    name = args.served_model_name or Path(args.model.rstrip("/")).name
    logging.getLogger("dsv4.server").info("environment: %s", json.dumps(describe_environment(engine.device)))
    if args.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("dsv4.server").warning("listening on %s without --api-key: anyone who can reach "
                                                 "the port can use the model", args.host)
    app = create_app(engine, name, api_key=args.api_key, max_request_bytes=args.max_request_bytes,
                     request_timeout=args.request_timeout, stall_seconds=args.stall_timeout)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info",
                timeout_graceful_shutdown=args.drain_timeout)
    return 0
