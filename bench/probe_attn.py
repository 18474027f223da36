"""Launch-parameter sweep of the sparse-attention kernels (forward and backward) at the bench and
V4-Flash head counts: heads per program, key block, warps, pipeline stages.

    python bench/probe_attn.py [--out probe_attn.json] [--quick]

Each row: the variant, its time (CUDA-event median of `triton.testing.do_bench`), TFLOP/s (forward
4·H·Dh, backward 8·H·Dh per valid (query, listed key) pair), the fraction of 790 TFLOP/s, and the
relative difference of its output from the default launch's and from float64 (first 64 queries). Inputs as `bench_kernels.py`: a 128-key window plus top-512 random compressed entries.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import PEAK_TFLOPS, attention_inputs, rel, timed  # noqa: E402


def sweep(name, S, H, T2, fwd_grid, bwd_grid, topk=512, contiguous=0):
    from dsv4.kernels import sparse_attention as sa
    dev, dtype, D = "cuda", torch.bfloat16, 512
    g = torch.Generator(device=dev).manual_seed(0)
    q, kv, kv2, idx, sink = attention_inputs(1, S, H, D, T2, 128, topk, dev, dtype, g)
    if contiguous:   # no gather: each query's list is the `contiguous` keys of kv ending at it (a wide window)
        s = torch.arange(S, device=dev)
        win = s[:, None] - contiguous + 1 + torch.arange(contiguous, device=dev)
        idx = torch.where(win >= 0, win, -1).to(torch.int32)[None].contiguous()
    scale = D ** -0.5
    valid = int((idx >= 0).sum())
    out0, lse0 = sa.forward(q, kv, idx, sink, scale, kv2)
    from dsv4 import ops
    n_chk = 64
    want = ops.sparse_attention_torch(q[:, :n_chk].double(), kv.double(), idx[:, :n_chk], sink.double(), scale,
                                      kv2.double())
    dout = torch.randn(q.shape, generator=g, device=dev).to(dtype)
    g0 = sa.backward(q, kv, idx, sink, scale, out0, lse0, dout, kv2) if bwd_grid else None
    rows = []
    for bh, bn, w, st in fwd_grid:
        row = {"case": name, "pass": "fwd", "block_h": bh, "block_n": bn, "warps": w, "stages": st}
        try:
            run = lambda: sa.forward(q, kv, idx, sink, scale, kv2, block_n=bn, num_warps=w, block_h=bh,  # noqa: E731
                                     num_stages=st)
            o, _ = run()
            ms = timed(run, False)
            fl = 4 * H * D * valid
            row.update(ms=ms, tflops=fl / ms / 1e9, frac_peak=fl / ms / 1e9 / PEAK_TFLOPS, rel_vs_default=rel(o, out0),
                       rel_vs_float64=rel(o[:, :n_chk], want))
        except Exception as exc:  # noqa: BLE001 (out of shared memory, registers: reported, the sweep goes on)
            row["error"] = f"{type(exc).__name__}: {exc}"[:160]
        print(json.dumps(row), flush=True)
        rows.append(row)
    for bh, bn, w, st in bwd_grid:
        row = {"case": name, "pass": "bwd", "block_h": bh, "block_n": bn, "warps": w, "stages": st}
        try:
            run = lambda: sa.backward(q, kv, idx, sink, scale, out0, lse0, dout, kv2, block_n=bn,  # noqa: E731
                                      num_warps=w, block_h=bh, num_stages=st)
            gr = run()
            ms = timed(run, False)
            fl = 8 * H * D * valid
            row.update(ms=ms, tflops=fl / ms / 1e9, frac_peak=fl / ms / 1e9 / PEAK_TFLOPS,
                       rel_vs_default=max(rel(a, b) for a, b in zip(gr[:3], g0[:3])))
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {exc}"[:160]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="fewer variants")
    ap.add_argument("--round9", action="store_true",
                    help="the forward only: 16 warps, 128-key blocks, contiguous keys, 128 heads a program "
                         "(V4-Pro's 128 heads, top-1024) beside the current launch")
    args = ap.parse_args(argv)
    rows = []
    if args.round9:   # (the ninth round's rows with lazy rescaling and warp_specialize ran kernels since removed)
        f64 = [(64, 64, 8, 2), (64, 64, 16, 2), (64, 128, 8, 1), (64, 128, 8, 2)]
        f128 = [(64, 64, 8, 2), (128, 64, 16, 2), (128, 32, 8, 2)]
        rows += sweep("flash CSA 4K (H 64)", 4096, 64, 1024, f64, [])
        rows += sweep("flash 640 contiguous keys 4K (H 64)", 4096, 64, 1024, f64[:1] + f64[2:], [], contiguous=640)
        rows += sweep("pro CSA 4K (H 128, top-1024)", 4096, 128, 1024, f128, [], topk=1024)
        return _finish(rows, args)
    st = (1, 2, 3)
    f64 = [(32, 32, 4, None)] + list(itertools.product((64,), (32, 64), (8,), st)) + [(64, 16, 8, 2), (64, 16, 4, 2)]
    b16 = list(itertools.product((16,), (16, 32, 64), (4, 8), (1, 2)))
    f16 = list(itertools.product((16,), (32, 64), (2, 4, 8), st))
    b64 = [(16, 32, 4, 1), (32, 32, 4, 1), (32, 16, 8, 1), (16, 32, 8, 2)]
    if args.quick:
        f16, b16, f64, b64 = f16[:4], b16[:4], f64[:4], b64[:2]
    rows += sweep("flash CSA 4K (H 64)", 4096, 64, 1024, f64, b64)
    rows += sweep("bench CSA 4K (H 16)", 4096, 16, 1024, f16, b16)
    return _finish(rows, args)


def _finish(rows, args) -> int:
    from dsv4.runlog import describe_environment
    env = describe_environment(torch.device("cuda"))
    best = {}
    for r in rows:
        if "tflops" in r:
            k = (r["case"], r["pass"])
            if k not in best or r["tflops"] > best[k]["tflops"]:
                best[k] = r
    for (c, p), r in best.items():
        print(f"best {p} {c}: {r['tflops']:.1f} TFLOP/s ({100 * r['frac_peak']:.1f}% of {PEAK_TFLOPS:.0f}) "
              f"block_h {r['block_h']} block_n {r['block_n']} warps {r['warps']} stages {r['stages']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
