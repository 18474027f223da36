"""The decode step's split sparse attention at V4-Flash shapes: launch variants of both launches.

A decode query's key list (128 window keys in a sliding layer, 128 + 64 in an HCA layer after 8K, 128 +
512 in a CSA layer) is split over programs (`dsv4.kernels.sparse_attention.forward_split`), each storing
its unnormalised partial sums, and a second launch merges them. This times variants of both: heads per
program, keys per split, key block and warps of the first; heads and columns per program of the merge.
Each timing is the median of CUDA-graph replays of a sweep over more key rows than the L2 holds (COPIES
caches), divided by the sweep length, so the keys come from HBM as in a decode step. Each variant's
output is checked against float64 (relative Frobenius norm). Prints a table and writes JSON.

    python3 bench/probe_decode_attn.py --out $OUT/decode_attn.json
    TRITON_INTERPRET=1 python3 bench/probe_decode_attn.py --small        # CPU: reduced sizes, no timing
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsv4 import ops  # noqa: E402
from dsv4.kernels import sparse_attention as sa  # noqa: E402
from probe_flash_decode import rel, sweep_us  # noqa: E402  (bench/, the script's folder, is on sys.path)

FLASH = dict(H=64, D=512, T=2048 + 128, lists={"sliding": 128, "hca": 192, "csa": 640})
SMALL = dict(H=8, D=64, T=96, lists={"sliding": 32, "csa": 80})


def cases(c, B, K, copies, device, g):
    """`copies` independent (q, kv, idx) of a decode step: B queries, K distinct listed keys each."""
    out = []
    for _ in range(copies):
        q = torch.randn(B, 1, c["H"], c["D"], device=device, generator=g).to(torch.bfloat16)
        kv = torch.randn(B, c["T"], c["D"], device=device, generator=g).to(torch.bfloat16)
        idx = torch.argsort(torch.rand(B, 1, c["T"], device=device, generator=g), -1)[..., :K].to(torch.int32)
        out.append((q, kv, idx))
    return out


def variants(small: bool, B: int):
    """(name, forward_split kwargs, keys per split)."""
    # "before": the launch of the fourteenth round (32 heads a split program, the merge one program per 16
    # heads reading one split at a time); "8 a load": the same merge shape reading 8 splits at once
    base = dict(block_h=32, block_n=32, num_warps=4, merge=(16, 512, 1))
    rows = [("before", base, 64), ("merge 16x512, 8 a load", dict(base, merge=(16, 512, 8)), 64)]
    merges = [(16, 128), (8, 128), (8, 64), (4, 128), (16, 64), (4, 512), (2, 256)]
    rows += [(f"merge {mh}x{md}", dict(base, merge=(mh, md)), 64) for mh, md in merges]
    fwd = [(bh, per, bn, w) for bh, per, bn, w in itertools.product([16, 32], [32, 64, 128], [16, 32, 64], [4, 8])
           if bn <= per and not (bh == 16 and w == 8)]
    if B > 1:
        fwd = [v for v in fwd if v[2] == 32 and v[3] == 4]
    for bh, per, bn, w in fwd:
        rows.append((f"h{bh} k{per} n{bn} w{w}", dict(block_h=bh, block_n=bn, num_warps=w, merge=sa.MERGE), per))
    if small:
        rows = [(n, dict(kw, block_h=min(kw["block_h"] or 8, 8), merge=(min(kw["merge"][0], 8), min(kw["merge"][1], 64),
                                                                           *kw["merge"][2:])),
                 min(per, 32)) for n, kw, per in rows[:3] + rows[-2:]]
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    c = SMALL if args.small else FLASH
    g = torch.Generator(device=device).manual_seed(0)
    sink = torch.randn(c["H"], device=device, generator=g)
    scale = c["D"] ** -0.5
    rows, t0 = [], time.time()
    for B in [int(b) for b in args.batches.split(",")]:
        # ≥ ~120 MB of key rows a sweep (the L2 holds 60 MB); 2 copies at batch 32
        copies = 1 if args.small else max(2, 120 * 2 ** 20 // (B * c["T"] * c["D"] * 2))
        for layer, K in c["lists"].items():
            cs = cases(c, B, K, copies, device, g)
            q, kv, idx = cs[0]
            want = ops.sparse_attention_torch(q.double(), kv.double(), idx, sink.double(), scale)
            for name, kw, per in variants(args.small, B):
                splits = -(-K // per)
                try:
                    out, _ = sa.forward_split(q, kv, idx, sink, scale, splits=splits, **kw)
                    err = rel(out, want)
                    us = sweep_us([lambda a=a: sa.forward_split(a[0], a[1], a[2], sink, scale, splits=splits, **kw)
                                   for a in cs], device)
                    rows.append(dict(B=B, layer=layer, K=K, variant=name, splits=splits, us=us, rel_err_f64=err))
                except Exception as e:                                   # noqa: BLE001 (a variant may not fit)
                    rows.append(dict(B=B, layer=layer, K=K, variant=name, splits=splits, error=repr(e)[:300]))
                r = rows[-1]
                print(f"B={B:2d} {layer:8s} K={K:4d} {name:20s} splits={splits:3d} "
                      + (f"{r['us']:7.2f} us  err {r['rel_err_f64']:.1e}" if "us" in r else r["error"][:80]),
                      flush=True)
    res = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)",
               torch=torch.__version__, triton=triton.__version__, shapes=c, wall_s=time.time() - t0, rows=rows)
    for B in sorted({r["B"] for r in rows}):
        for layer in c["lists"]:
            ok = sorted((r for r in rows if r["B"] == B and r["layer"] == layer and "us" in r), key=lambda r: r["us"])
            before = next((r["us"] for r in ok if r["variant"] == "before"), float("nan"))
            print(f"best B={B} {layer}: " + ", ".join(f"{r['variant']} {r['us']:.2f}" for r in ok[:4])
                  + f" (before {before:.2f})")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
        print("wrote", args.out)


if __name__ == "__main__":
    main()
