"""Count the operators one decode step launches (CPU profiler; on a GPU each non-view op is a kernel).

    python bench/count_decode_ops.py [--preset bench] [--batch 1]

Prints the number of top-level aten ops of `Transformer.decode_step`, the number that are not views
(each a kernel launch on CUDA), and those that come from mHC's Sinkhorn normalisation.
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv4 import ops  # noqa: E402
from dsv4.cache import DecodeCache  # noqa: E402
from dsv4.config import preset  # noqa: E402
from dsv4.model import Transformer  # noqa: E402

VIEWS = {"aten::slice", "aten::unsqueeze", "aten::select", "aten::view", "aten::flatten", "aten::unflatten",
         "aten::t", "aten::reshape", "aten::expand", "aten::split", "aten::transpose", "aten::permute",
         "aten::squeeze", "aten::as_strided", "aten::alias", "aten::_unsafe_view", "aten::detach",
         "aten::split_with_sizes", "aten::narrow", "aten::to"}


@torch.no_grad()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    cfg = preset(args.preset)
    model = Transformer(cfg).eval()
    cache = DecodeCache(cfg, args.batch, 512)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, 200))
    rows = torch.arange(args.batch)
    model(ids, cache=cache)
    model.decode_step(ids[:, :1], cache, rows)
    real = ops.hc_split_sinkhorn

    def tagged(*a, **k):
        with record_function("sinkhorn"):
            return real(*a, **k)

    ops.hc_split_sinkhorn = tagged
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model.decode_step(ids[:, :1], cache, rows)
    finally:
        ops.hc_split_sinkhorn = real
    top = [e for e in prof.events() if e.name.startswith("aten::")
           and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    kernels = [e for e in top if e.name not in VIEWS]

    def in_sinkhorn(e):
        p = e.cpu_parent
        while p is not None:
            if p.name == "sinkhorn":
                return True
            p = p.cpu_parent
        return False

    print(f"{args.preset}, batch {args.batch}: {len(top)} top-level aten ops per decode step, "
          f"{len(kernels)} not views or casts, {sum(map(in_sinkhorn, kernels))} of those in mHC's Sinkhorn")
    print(collections.Counter(e.name for e in kernels).most_common(8))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
