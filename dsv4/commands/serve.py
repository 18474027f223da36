"""`dsv4 serve --model DIR`: OpenAI-compatible HTTP server (see dsv4/server.py and docs/serving.md)."""
from __future__ import annotations

import argparse
import json
import logging
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


def run(args) -> int:
    from pathlib import Path

    import uvicorn

    from dsv4.engine import Engine
    from dsv4.runlog import describe_environment
    from dsv4.server import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    model, tokenizer = load(args)
    engine = Engine(model, tokenizer, max_batch=args.max_batch, max_len=args.max_len, max_queue=args.max_queue,
                    **engine_options(args))
    name = args.served_model_name or Path(args.model.rstrip("/")).name
    logging.getLogger("dsv4.server").info("environment: %s", json.dumps(describe_environment(engine.device)))
    uvicorn.run(create_app(engine, name), host=args.host, port=args.port, log_level="info")
    return 0
