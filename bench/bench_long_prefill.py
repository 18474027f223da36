"""Longest prompt dsv4 prefills on one GPU: chunked prefill into a DecodeCache at growing lengths.

    python bench/bench_long_prefill.py --lengths 65536,262144,1048576 --chunk 16384 [--budget-s 120]

For each length: wall time of the whole chunked prefill (last-token logits of each chunk), tokens/s,
CUDA peak memory and the cache's own bytes. Stops at the first length that runs out of memory or
would exceed the time budget (estimated from the previous length, attention cost growing ~ L²).
`--peer-lengths 16384,24576,32768` first tries transformers' DeepseekV4ForCausalLM (eager, one
forward with its cache, last-token logits) at those lengths in the same process, until it runs out
of memory, so both longest prompts come from one run.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from dsv4.cache import DecodeCache  # noqa: E402
from dsv4.config import preset  # noqa: E402
from dsv4.model import Transformer  # noqa: E402


@torch.no_grad()
def peer_longest(cfg, lengths: list[int]) -> list[dict]:
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    torch.manual_seed(0)
    hf = DeepseekV4ForCausalLM(DeepseekV4Config(**cfg.to_hf_config())).to(torch.bfloat16).to("cuda").eval()
    rows = []
    for L in lengths:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(0, cfg.vocab_size, (1, L), device="cuda")
        try:
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = hf(input_ids=ids, use_cache=True, logits_to_keep=1)
            torch.cuda.synchronize()
            row = {"tokens": L, "seconds": time.perf_counter() - t, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                   "finite": bool(torch.isfinite(out.logits).all())}
            out = None
        except torch.OutOfMemoryError:
            row = {"tokens": L, "oom": True}
        rows.append(row)
        print("transformers", json.dumps(row))
        if row.get("oom"):
            break
    hf = None
    torch.cuda.empty_cache()
    return rows


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--lengths", default="16384,65536,262144,1048576")
    ap.add_argument("--chunk", type=int, default=16384)
    ap.add_argument("--budget-s", type=float, default=120.0)
    ap.add_argument("--peer-lengths", default="", help="transformers prompt lengths to try first")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = "cuda"
    cfg = preset(args.preset)
    peer_rows = peer_longest(cfg, [int(x) for x in args.peer_lengths.split(",") if x]) if args.peer_lengths else []
    torch.manual_seed(0)
    model = Transformer(cfg).to_dtype(torch.bfloat16).to(dev).eval()
    rows, last = [], None
    for L in [int(x) for x in args.lengths.split(",")]:
        if last is not None and last[1] * (L / last[0]) ** 2 > args.budget_s:
            print(f"skip {L}: estimated {last[1] * (L / last[0]) ** 2:.0f} s > budget")
            break
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            cache = DecodeCache(cfg, 1, L, device=dev, dtype=torch.bfloat16)
            ids = torch.randint(0, cfg.vocab_size, (1, L), device=dev)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for s in range(0, L, args.chunk):
                out = model(ids[:, s:s + args.chunk], cache=cache, last_only=True)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t
        except torch.OutOfMemoryError:
            print(f"{L}: out of memory")
            rows.append({"tokens": L, "oom": True})
            break
        row = {"tokens": L, "seconds": dt, "tok_per_s": L / dt, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
               "cache_gib": cache.nbytes() / 2**30, "finite": bool(torch.isfinite(out).all())}
        rows.append(row)
        print(json.dumps(row))
        last = (L, dt)
    res = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "preset": args.preset, "chunk": args.chunk, "rows": rows, "transformers_rows": peer_rows}
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
