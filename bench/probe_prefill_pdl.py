"""Does launching with PDL change a host-bound prefill? The `bench` model's cached prefill of one prompt,
timed in alternating rounds with programmatic dependent launch on and off (`dsv4.kernels.launch.ENABLED`)
in one process, so that the host's speed, which moves between runs, is the same for both.

    python bench/probe_prefill_pdl.py [--lengths 4096,16384] [--rounds 6] [--out probe_prefill_pdl.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv4.cache import DecodeCache  # noqa: E402
from dsv4.config import preset  # noqa: E402
from dsv4.kernels import launch  # noqa: E402
from dsv4.model import Transformer  # noqa: E402


@torch.no_grad()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="4096,16384")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    cfg = preset("bench")
    torch.manual_seed(0)
    model = Transformer(cfg).to(dev).to_dtype(torch.bfloat16).eval()
    model.pack_projections()
    res = {"rows": []}
    for n in (int(x) for x in args.lengths.split(",")):
        ids = torch.randint(0, cfg.vocab_size, (1, n), device=dev)
        cache = DecodeCache(cfg, 1, n + 64, device=dev, dtype=torch.bfloat16)
        rows = torch.zeros(1, dtype=torch.long, device=dev)
        outs = {}

        def prefill():
            cache.reset(rows)
            return model(ids, cache=cache, rows=rows, last_only=True)

        times = {"on": [], "off": []}
        for mode in ("on", "off"):          # warm-up (compiles both variants)
            launch.ENABLED = mode == "on"
            for _ in range(2):
                outs[mode] = prefill().float()
        for _ in range(args.rounds):
            for mode in ("on", "off"):
                launch.ENABLED = mode == "on"
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                prefill()
                torch.cuda.synchronize()
                times[mode].append(time.perf_counter() - t0)
        launch.ENABLED = True
        row = {"prompt": n, "equal_logits": bool(torch.equal(outs["on"], outs["off"])),
               **{f"best_ms_{m}": min(t) * 1e3 for m, t in times.items()},
               **{f"median_ms_{m}": sorted(t)[len(t) // 2] * 1e3 for m, t in times.items()},
               **{f"tok_s_best_{m}": n / min(t) for m, t in times.items()}}
        print(json.dumps(row), flush=True)
        res["rows"].append(row)
    from dsv4.runlog import describe_environment
    res["env"] = describe_environment(dev)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
