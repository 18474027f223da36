"""The decode step's bf16 projections: cuBLAS (`F.linear` / an fp32-output GEMM) against the one-launch
GEMV of `dsv4.kernels.gemv` at its default tiles and a few launch variants.

Shapes are the bench preset's packed projection groups and single projections (N x K): x-group 1040 x
1024, compressor group 2560 x 1024 (fp32 output), query group 10240 x 512, wo_b 1024 x 2048, shared
expert 1024 x 1024 and 1024 x 512, router 16 x 1024 (fp32 output); M = 1 and 2 rows. Each row is
checked against float64 and timed from CUDA-graph replay (median, `triton.testing.do_bench_cudagraph`);
unless `--hot` every call reads another copy of the weight (>= 256 MB of copies), so weights come from
HBM as in a decode step. Prints µs, GB/s and the fraction of 4.3 TB/s.

    python3 bench/probe_gemv.py --out probe_gemv.json
    TRITON_INTERPRET=1 python3 bench/probe_gemv.py --smoke          # CPU: tiny shapes, correctness only
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsv4.kernels import gemv as kern  # noqa: E402

HBM = 4.3e12
COLD_BYTES = 256 << 20
SHAPES = [("x group", 1040, 1024, False), ("compressor group", 2560, 1024, True), ("query group", 10240, 512, False),
          ("wo_b", 1024, 2048, False), ("shared w1|w3", 1024, 1024, False), ("shared w2", 1024, 512, False),
          ("router", 16, 1024, True)]
VARIANTS = [dict(BN=1, BK=1024, num_warps=4), dict(BN=2, BK=512, num_warps=4), dict(BN=4, BK=256, num_warps=4),
            dict(BN=8, BK=256, num_warps=4), dict(BN=16, BK=128, num_warps=4), dict(BN=4, BK=512, num_warps=8)]


def graph_us(fn, calls: int) -> float:
    import triton.testing
    return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median") / calls


@torch.no_grad()
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hot", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    smoke = args.smoke or not torch.cuda.is_available()
    dev = torch.device("cpu" if smoke else "cuda")
    dt = torch.float32 if smoke else torch.bfloat16
    rows_out = []
    torch.manual_seed(0)
    for name, N, K, fp32 in SHAPES:
        if smoke:
            N, K = max(1, N // 64), max(16, K // 32)
        copies = 1 if args.hot or smoke else max(1, COLD_BYTES // (N * K * 2))
        ws = [torch.randn(N, K, device=dev, dtype=dt) / K ** 0.5 for _ in range(copies)]   # each its own bytes
        out_dt = torch.float32 if fp32 else dt
        for M in (1, 2):
            x = torch.randn(M, K, device=dev, dtype=dt)
            ref = x.double() @ ws[0].double().t()
            cands = [("cublas", None)] + [("gemv", None)] + [("gemv", v) for v in VARIANTS]
            for impl, v in cands:
                if impl == "cublas":
                    def one(w):
                        return torch.mm(x, w.t(), out_dtype=torch.float32) if fp32 and not smoke else F.linear(x, w)
                else:
                    def one(w, v=v):
                        return kern.gemv(x, w, out_dt, **(v or {}))
                y = one(ws[0])
                err = float((y.double() - ref).abs().max() / ref.abs().max())
                row = {"shape": name, "N": N, "K": K, "M": M, "fp32_out": fp32, "impl": impl,
                       "launch": v or (kern.tiles(N, K, dev) if impl == "gemv" else None), "err": err}
                if not smoke:
                    us = graph_us(lambda: [one(w) for w in ws], len(ws))
                    gbs = N * K * 2 / (us * 1e-6) / 1e9
                    row.update(us=us, gbs=gbs, frac_hbm=gbs * 1e9 / HBM)
                rows_out.append(row)
                print(f"{name:18s} {N:6d}x{K:<5d} M={M} {impl:7s} {json.dumps(row['launch']):45s} "
                      + (f"{row['us']:7.2f} us {row['gbs']:7.0f} GB/s {row['frac_hbm']:.2f}  " if not smoke else "")
                      + f"err {err:.1e}", flush=True)
    if args.out:
        meta = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if not smoke else "cpu",
                "cold": not args.hot}
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows_out}, indent=1))


if __name__ == "__main__":
    main()
