"""Routed-experts primitive (`dsv4.ops.moe_experts`): the reference loop against the grouped path.

One MoE layer of the `bench` preset by default (D 1024, I 512, E 16, K 2), random top-K routing, for
N tokens each: forward, and forward + backward (gradients to x, routing weights, w1, w2, w3).
Implementations (`--impls`):
  loop     ops.moe_experts_loop: one matmul per expert with tokens, one host sync per call
  grouped  ops.moe_experts_grouped: torch._grouped_mm on tokens sorted by expert, no host sync
  gather   ops.moe_experts_gather: a bmm per (token, expert) pair; only sensible for small N·K
  auto     ops.moe_experts: whichever of the three `ops.moe_path` picks (shown in the table)
On CUDA the time of an iteration is measured with CUDA events around `--iters` back-to-back calls after
`--warmup` calls (host syncs inside the loop path are part of its cost); on CPU with perf_counter.
The best of `--repeats` measurements is kept. `max|Δy|` is the largest difference from the loop's output.

    python bench/bench_moe.py --out bench_moe.json                         # CUDA, bf16
    python bench/bench_moe.py --device cpu --dtype fp32 --tokens 1,8,32 --iters 3 --repeats 1   # smoke
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsv4 import ops  # noqa: E402
from dsv4.config import preset  # noqa: E402
from dsv4.runlog import describe_environment  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IMPLS = {"loop": ops.moe_experts_loop, "grouped": ops.moe_experts_grouped, "gather": ops.moe_experts_gather,
         "auto": ops.moe_experts}


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv=None):
    cfg = preset("bench")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--tokens", type=ints, default=[1, 8, 32, 4096, 16384], help="N, comma-separated")
    p.add_argument("--dim", type=int, default=cfg.hidden_size, help="D (default: bench preset)")
    p.add_argument("--inter", type=int, default=cfg.moe_intermediate_size, help="I (default: bench preset)")
    p.add_argument("--experts", type=int, default=cfg.n_routed_experts, help="E (default: bench preset)")
    p.add_argument("--topk", type=int, default=cfg.num_experts_per_tok, help="K (default: bench preset)")
    p.add_argument("--impls", default="loop,grouped", help=f"comma-separated from {','.join(IMPLS)}")
    p.add_argument("--gather-max-pairs", type=int, default=4096,
                   help="skip 'gather' above this many (token, expert) pairs (it copies N·K expert matrices)")
    p.add_argument("--limit", type=float, default=cfg.swiglu_limit, help="SwiGLU clamp")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def make_inputs(args, N: int, dev: torch.device, dtype: torch.dtype):
    g = torch.Generator().manual_seed(args.seed + N)
    D, I, E, K = args.dim, args.inter, args.experts, args.topk
    x = torch.randn(N, D, generator=g)
    idx = torch.rand(N, E, generator=g).topk(K, dim=-1).indices           # K distinct experts per token
    weight = torch.rand(N, K, generator=g)
    weight = weight / weight.sum(-1, keepdim=True)
    w1 = torch.randn(E, I, D, generator=g) / D ** 0.5
    w2 = torch.randn(E, D, I, generator=g) / I ** 0.5
    w3 = torch.randn(E, I, D, generator=g) / D ** 0.5
    gy = torch.randn(N, D, generator=g)
    floats = [t.to(dev, dtype) for t in (x, w1, w2, w3, gy)]
    return floats[0], idx.to(dev), weight.to(dev), floats[1], floats[2], floats[3], floats[4]


def timed(fn, dev: torch.device, warmup: int, iters: int, repeats: int) -> float:
    """Best seconds per call over `repeats` runs of `iters` calls (after `warmup` calls)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(dev)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize(dev)
            best = min(best, start.elapsed_time(end) / 1e3 / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            best = min(best, (time.perf_counter() - t0) / iters)
    return best


def measure(args, impl: str, N: int, dev: torch.device, dtype: torch.dtype, y_loop) -> tuple[dict, torch.Tensor]:
    fn = IMPLS[impl]
    x, idx, weight, w1, w2, w3, gy = make_inputs(args, N, dev, dtype)
    row = {"impl": impl, "tokens": N, "path": ops.moe_path(x, idx, w1, w2, w3) if impl == "auto" else impl}
    if impl == "grouped" and not ops.grouped_mm_applies(x, w1, w2, w3):
        row["note"] = "grouped_mm has no sync-free kernel here (it falls back to a loop over groups)"
    with torch.no_grad():
        y = fn(x, idx, weight, w1, w2, w3, args.limit)
        row["max_abs_diff_vs_loop"] = 0.0 if y_loop is None else float((y.float() - y_loop.float()).abs().max())
        row["forward_ms"] = 1e3 * timed(lambda: fn(x, idx, weight, w1, w2, w3, args.limit), dev,
                                        args.warmup, args.iters, args.repeats)
    leaves = [t.requires_grad_() for t in (x, weight, w1, w2, w3)]

    def step():
        out = fn(leaves[0], idx, leaves[1], leaves[2], leaves[3], leaves[4], args.limit)
        torch.autograd.grad(out, leaves, gy)

    row["forward_backward_ms"] = 1e3 * timed(step, dev, args.warmup, args.iters, args.repeats)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        step()
        row["peak_gib_forward_backward"] = torch.cuda.max_memory_allocated(dev) / 2**30
    return row, y


def main(argv=None) -> int:
    args = parse_args(argv)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    impls = [i for i in args.impls.split(",") if i]
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        raise SystemExit(f"unknown --impls {unknown}; choose from {list(IMPLS)}")
    env = describe_environment(dev)
    print(f"# {time.strftime('%Y-%m-%d')}  {env['device']['name']}  torch {env['versions']['torch']}  "
          f"commit {(env['git']['commit'] or '?')[:10]}")
    print(f"# D {args.dim}, I {args.inter}, E {args.experts}, K {args.topk}, {args.dtype}; "
          f"warmup {args.warmup}, iters {args.iters}, best of {args.repeats}")
    print(f"# command: python {' '.join(sys.argv)}")
    print(f"{'N':>7} {'impl':<8} {'path':<8} {'fwd ms':>10} {'fwd+bwd ms':>11} {'fwd ×':>7} {'f+b ×':>7} "
          f"{'max|Δy|':>9}")
    rows = []
    for N in args.tokens:
        base, y_loop = None, None
        for impl in impls:
            if impl == "gather" and N * args.topk > args.gather_max_pairs:
                continue
            row, y = measure(args, impl, N, dev, dtype, y_loop)
            if impl == "loop":
                base, y_loop = row, y
            if base is not None and base is not row:
                row["forward_speedup_vs_loop"] = base["forward_ms"] / row["forward_ms"]
                row["forward_backward_speedup_vs_loop"] = base["forward_backward_ms"] / row["forward_backward_ms"]
            rows.append(row)
            sp = (f"{row['forward_speedup_vs_loop']:>6.2f}× {row['forward_backward_speedup_vs_loop']:>6.2f}×"
                  if "forward_speedup_vs_loop" in row else f"{'':>7} {'':>7}")
            print(f"{N:>7} {impl:<8} {row['path']:<8} {row['forward_ms']:>10.3f} {row['forward_backward_ms']:>11.3f} "
                  f"{sp} {row['max_abs_diff_vs_loop']:>9.2e}" + (f"  ({row['note']})" if "note" in row else ""))
    if args.out:
        result = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": sys.argv,
                  "torch": torch.__version__, "device": env["device"]["name"], "environment": env,
                  "shape": {"D": args.dim, "I": args.inter, "E": args.experts, "K": args.topk},
                  "dtype": args.dtype, "timing": {"warmup": args.warmup, "iters": args.iters,
                                                  "repeats": args.repeats,
                                                  "clock": "cuda events" if dev.type == "cuda" else "perf_counter"},
                  "rows": rows}
        Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"# wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
