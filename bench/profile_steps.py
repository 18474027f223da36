"""Where the time goes: torch.profiler over a cached prefill (batch 1), an eager decode step and a
training step (forward + next-token CE + backward, bf16 weights) of the `bench` preset on CUDA; prints
the top kernels by CUDA time and writes the tables to --out-dir.

Each section also prints its anatomy: wall time without the profiler (best of 3), the kernels' summed
time and count (is the step bound by the GPU or by the host issuing it?), and every host
synchronisation with the dsv4 line that caused it (`torch.cuda.set_sync_debug_mode`).

  python bench/profile_steps.py --prefill 16384 --decode 4096 --train 4096 --out-dir prof
"""
from __future__ import annotations

import argparse
import collections
import cProfile
import io
import pstats
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsv4 import ops  # noqa: E402
from step_profile import capture, profile_once  # noqa: E402
from dsv4.cache import DecodeCache  # noqa: E402
from dsv4.config import preset  # noqa: E402
from dsv4.model import Transformer  # noqa: E402


def best_ms(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def sync_sites(fn) -> dict:
    """{dsv4 file:line: count} of the host synchronisations one call of fn makes."""
    sites = collections.Counter()
    for _, stack in capture(fn, frames=40):
        frames = [f for f in stack if "/dsv4/" in f.filename]
        sites[f"{frames[-1].filename.split('/dsv4/')[-1]}:{frames[-1].lineno}" if frames else "?"] += 1
    return dict(sites.most_common())


def host_profile(fn, path: Path, top: int = 30) -> str:
    """cProfile of one call (the host side: Python, dispatch, launches), by own time; written to path."""
    pr = cProfile.Profile()
    pr.enable()
    fn()
    torch.cuda.synchronize()
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(top)
    path.write_text(buf.getvalue())
    return buf.getvalue()


def anatomy(name: str, fn, busy: float, n: int, out: Path) -> dict:
    """Wall time against the kernels' (busy ms, n kernels), host syncs and a host profile of fn."""
    text = host_profile(fn, out / f"{name}_host.txt")
    print("\n".join(text.splitlines()[:22]), flush=True)
    wall = best_ms(fn)
    res = {"wall_ms": wall, "kernel_ms": busy, "kernels": n, "kernel_fraction": busy / wall,
           "syncs": sync_sites(fn)}
    print(f"== {name} anatomy: wall {wall:.2f} ms, kernels {busy:.2f} ms ({n} kernels, {busy / wall:.0%} of the "
          f"wall), host syncs {sum(res['syncs'].values())}: {res['syncs']}", flush=True)
    (out / f"{name}_anatomy.json").write_text(json.dumps(res, indent=1))
    return res


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--prefill", type=int, default=16384)
    ap.add_argument("--decode", type=int, default=0, help="profile one eager decode step after this many tokens")
    ap.add_argument("--train", type=int, default=4096)
    ap.add_argument("--out-dir", default="prof")
    args = ap.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    cfg = preset(args.preset)
    torch.manual_seed(0)
    model = Transformer(cfg).to(dev).to_dtype(torch.bfloat16).eval()
    model.pack_projections()          # inference: projection groups as one GEMM each
    print(ops.describe_backends())
    if args.prefill:
        ids = torch.randint(0, cfg.vocab_size, (1, args.prefill), device=dev)

        @torch.no_grad()
        def prefill():
            model(ids, cache=DecodeCache(cfg, 1, args.prefill + 64, device=dev, dtype=torch.bfloat16),
                  last_only=True)
        section("prefill", f"prefill {args.prefill}", prefill, out)
    if args.decode:
        ids = torch.randint(0, cfg.vocab_size, (1, args.decode), device=dev)
        rows = torch.zeros(1, dtype=torch.long, device=dev)
        with torch.no_grad():
            cache = DecodeCache(cfg, 1, args.decode + 64, device=dev, dtype=torch.bfloat16)
            model(ids, cache=cache, last_only=True)
        start = cache.lengths.clone()

        @torch.no_grad()
        def step():
            cache.lengths.copy_(start)
            model.decode_step(ids[:, :1], cache, rows)
        section("decode", f"decode step after {args.decode}", step, out)
    if args.train:
        model.train()
        ids = torch.randint(0, cfg.vocab_size, (1, args.train + 1), device=dev)

        def train_step():
            logits = model(ids[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            model.zero_grad(set_to_none=True)
        section("train", f"train step {args.train}", train_step, out)


def section(name: str, title: str, fn, out: Path) -> None:
    """Two warm-up calls, one profiled call (kernel table to out/name.txt), then the anatomy."""
    for _ in range(2):
        fn()
    t, busy, n, details = profile_once(fn, details=True)
    (out / f"{name}.txt").write_text(t)
    (out / f"{name}_kernels.txt").write_text(details)
    print(f"== {title}\n{t}")
    anatomy(name, fn, busy, n, out)


if __name__ == "__main__":
    main()
