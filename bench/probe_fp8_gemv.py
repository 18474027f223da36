"""The FP8 GEMM at decode sizes: the tiled split-K path against the GEMV path's launch variants.

For the V4-Flash matrices wq_a (1024 x 4096), wq_b (32768 x 1024), wkv (512 x 4096) and wo_b (4096 x 8192)
and M = 1, 2, 4 rows of bf16 activations (`--dtype`): the tiled kernel with its K split (`path="tiled"`, what decode
ran before the GEMV), the GEMV at its default tiles and at each of `GEMV_VARIANTS`, each checked against
the PyTorch twin (max |error| / max |twin|) and timed from CUDA-graph replay (median over replays of a
graph of many calls: `triton.testing.do_bench_cudagraph`). Weight bytes (fp8 + scales) per second and the
fraction of the H200's measured 4.3 TB/s are printed per row, with the compiled kernel's registers and
spills. Unless `--hot`, every call reads another copy of the weight (copies of >= 256 MB together),
so the weights come from HBM, not from the 50 MB L2, as in a decode step that runs through all layers.

    python3 bench/probe_fp8_gemv.py --out probe_fp8_gemv.json
    TRITON_INTERPRET=1 python3 bench/probe_fp8_gemv.py --smoke        # CPU: tiny shapes, correctness only
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

if "--smoke" in sys.argv:   # the interpreter is read when triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton.testing  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_flash_shaped import HBM_BYTES_PER_S, fp8_shapes, random_fp8  # noqa: E402
from dsv4 import ops  # noqa: E402
from dsv4.commands.convert import random_like_config  # noqa: E402
from dsv4.kernels import fp8_gemm  # noqa: E402

SHAPES = ("wq_a", "wq_b", "wkv", "wo_b")
COLD_BYTES = 256 << 20          # weight copies cycled per timed call: several times the H200's L2


def relmax(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).abs().max() / ref.double().abs().max())


def graph_us(fn, calls: int) -> float:
    """Median µs per call of `fn` (which makes `calls` calls) from CUDA-graph replay."""
    return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median") / calls


def launch(path: str, cfg: dict | None, x2: torch.Tensor, w: torch.Tensor, s: torch.Tensor):
    """One call of the path; the GEMV's compiled kernel (registers, spills) comes back as well."""
    if path == "tiled":
        return fp8_gemm._fp8_gemm(x2, w, s, 128, 128, path="tiled"), None
    y = torch.empty(x2.shape[0], w.shape[0], dtype=x2.dtype, device=x2.device)
    tiles = {**fp8_gemm._gemv_tiles(x2.shape[0], w.shape[0], w.shape[1], 128, x2.device), **(cfg or {})}
    kernel = fp8_gemm._fp8_gemv(x2, w, s, 128, 128, y, tiles)
    return y, kernel


@torch.no_grad()
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,4", help="values of M")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"a subset of {','.join(SHAPES)}")
    ap.add_argument("--variants", default=None,
                    help="JSON list of GEMV tiles (or a file holding one) instead of GEMV_VARIANTS")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                    help="activations (default: bf16 on the GPU, fp32 with --smoke: a tight check)")
    ap.add_argument("--hot", action="store_true", help="one weight copy (L2-resident where it fits)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, correctness only")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    smoke = args.smoke or not torch.cuda.is_available()
    if smoke and not fp8_gemm.INTERPRET:
        raise SystemExit("no GPU: run with --smoke under TRITON_INTERPRET=1")
    dev = torch.device("cpu" if smoke else "cuda")
    rows = [int(r) for r in args.rows.split(",")]
    if args.variants:
        text = args.variants if args.variants.lstrip().startswith("[") else Path(args.variants).read_text()
        variants = json.loads(text)
    else:
        variants = fp8_gemm.GEMV_VARIANTS
    if smoke:
        shapes = {"tiny_a": (72, 200), "tiny_b": (40, 384)}
    else:
        cfg = random_like_config("deepseek-v4-flash", layers=1, mtp=0, experts=None)
        shapes = {k: v for k, v in fp8_shapes(cfg).items() if k in args.shapes.split(",")}
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("fp32" if smoke else "bf16")]
    # bf16: the rounding of one output on each side (the interpreter truncates: twice that); fp32: summation order
    tol = 1e-5 if dtype == torch.float32 else 2e-2 if smoke else 1e-2
    res = {"device": torch.cuda.get_device_name() if not smoke else "cpu (interpreter)", "hot": args.hot,
           "dtype": str(dtype),
           "hbm_bytes_per_s": HBM_BYTES_PER_S, "gemv_max_rows": fp8_gemm.GEMV_MAX_ROWS, "rows": []}
    bad = 0
    print(f"{'matrix':>6s} {'N x K':>12s} {'M':>2s} {'path':>6s} {'tiles':>26s} {'us':>8s} {'GB/s':>8s} "
          f"{'of HBM':>6s} {'regs':>4s} {'spill':>5s} {'rel err':>8s}", flush=True)
    for name, (N, K) in shapes.items():
        g = torch.Generator(device=dev).manual_seed(N + K)
        w, s = random_fp8(N, K, dev)
        nbytes = N * K + s.numel() * s.element_size()
        copies = 1 if (args.hot or smoke) else max(2, math.ceil(COLD_BYTES / nbytes))
        ws = [(w, s)] + [(w.clone(), s.clone()) for _ in range(copies - 1)]
        for M in rows:
            x = torch.randn(M, K, device=dev, dtype=dtype, generator=g)
            twin = ops.fp8_linear_torch(x, w, s)
            default = fp8_gemm._gemv_tiles(M, N, K, 128, dev)
            runs = [("tiled", None), ("gemv", None)] + [("gemv", v) for v in variants if v != default]
            for path, var in runs:
                row = {"matrix": name, "N": N, "K": K, "M": M, "path": path,
                       "tiles": "split-K" if path == "tiled" else (var or {**default, "default": True}),
                       "weight_bytes": nbytes, "roofline_us": nbytes / HBM_BYTES_PER_S * 1e6}
                try:
                    out, kernel = launch(path, var, x, w, s)
                    row["rel_err_vs_twin"] = err = relmax(out, twin)
                    if kernel is not None and hasattr(kernel, "n_regs"):
                        row["regs"], row["spills"] = int(kernel.n_regs), int(kernel.n_spills)
                    if not smoke:
                        def fn(path=path, var=var, x=x, ws=ws):
                            return [launch(path, var, x, a, b) for a, b in ws]
                        row["us"] = us = graph_us(fn, copies)
                        row["GBps"] = nbytes / (us * 1e-6) / 1e9
                        row["of_hbm"] = nbytes / (us * 1e-6) / HBM_BYTES_PER_S
                except Exception as exc:   # a variant that does not compile or fit: recorded, skipped
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                    print(f"{name:>6s} {N:>5d} x {K:<5d} {M:>2d} {path:>6s} {str(var):>26s} error: {row['error']}",
                          flush=True)
                    res["rows"].append(row)
                    bad += 1
                    continue
                bad += err > tol
                tiles = "split-K" if path == "tiled" else ("default " if var is None else "") + \
                    "{BN},{BK},w{num_warps},s{num_stages},r{RSUB}".format(**{"RSUB": 1, **(var or default)})
                timing = (f"{row['us']:8.2f} {row['GBps']:8.1f} {row['of_hbm']:6.2f}" if "us" in row
                          else f"{'-':>8s} {'-':>8s} {'-':>6s}")
                print(f"{name:>6s} {N:>5d} x {K:<5d} {M:>2d} {path:>6s} {tiles:>26s} {timing} "
                      f"{row.get('regs', '-'):>4} {row.get('spills', '-'):>5} {err:8.1e}"
                      f"{'' if err <= tol else '  <- above ' + str(tol)}", flush=True)
                res["rows"].append(row)
    if not smoke:   # the fastest GEMV tiles per (matrix, M) and the tiled path beside them
        res["best"] = {}
        for name in shapes:
            for M in rows:
                mine = [r for r in res["rows"] if r["matrix"] == name and r["M"] == M and "us" in r
                        and r["rel_err_vs_twin"] <= tol]
                gemv = [r for r in mine if r["path"] == "gemv"]
                tiled = [r for r in mine if r["path"] == "tiled"]
                if gemv:
                    b = min(gemv, key=lambda r: r["us"])
                    res["best"][f"{name} M={M}"] = {"tiles": b["tiles"], "us": b["us"], "of_hbm": b["of_hbm"],
                                                    "tiled_us": tiled[0]["us"] if tiled else None}
                    print(f"best {name} M={M}: {b['tiles']} {b['us']:.2f} us ({b['of_hbm']:.2f} of HBM); tiled "
                          f"{tiled[0]['us'] if tiled else float('nan'):.2f} us", flush=True)
    print(f"{bad} run(s) failed or above the tolerance {tol}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
