"""Compile the FP8 decode GEMV (`dsv4/kernels/fp8_gemm.py`, `_fp8_gemv_kernel`) for sm90 without a GPU and
count the SASS instructions of its K loop per weight byte, at the default launch of each V4-Flash decode
shape and at the variants given.

An H200 SM streams ~16-18 B a clock from HBM and issues 128 thread instructions a clock, so a GEMV that
issues more than ~7 instructions per weight byte cannot reach HBM bandwidth (and one close to that
bound leaves no slack to hide latency). Same method as `sass_fp4_gemv.py` (divisibility attributes as
the JIT gives them at run time).

    python3 bench/sass_fp8_gemv.py                          # default tiles of every V4-Flash shape
    python3 bench/sass_fp8_gemv.py --rsub 1                 # the one-row rule before sub-tiles
    python3 bench/sass_fp8_gemv.py --variant 32,128,4,4     # BN, BK, warps, RSUB at each shape
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dsv4.kernels import fp8_gemm  # noqa: E402
from sass_fp4_gemv import report  # noqa: E402

SIG = dict(x_ptr="*bf16", w_ptr="*u8", s_ptr="*u8", y_ptr="*bf16", N="i32", K="i32", group_n="i32", stride_xm="i32",
           stride_xg="i32", stride_wn="i32", stride_sn="i32", stride_ym="i32", ROWS="constexpr", SBN="constexpr",
           SBK="constexpr", SCALE_E8M0="constexpr", NATIVE_FP8="constexpr", BN="constexpr", BK="constexpr",
           RSUB="constexpr")
# (rows, columns, programs per SM of the launch rule) of V4-Flash's FP8 decode GEMVs, projections packed as
# the model packs them (the compressors' and weights_proj are bf16 in the release: not here)
SHAPES = {"x: wq_a+wkv": (1536, 4096, 6), "qr: wq_b": (32768, 1024, 6), "qr: indexer.wq_b": (8192, 1024, 6),
          "wo_a (8 groups)": (8192, 4096, 12), "wo_b": (4096, 8192, 6), "shared w1+w3": (4096, 4096, 6),
          "shared w2": (4096, 2048, 6)}


def count(N: int, K: int, bn: int, bk: int, warps: int, rsub: int) -> dict:
    consts = dict(ROWS=1, SBN=128, SBK=128, SCALE_E8M0=True, NATIVE_FP8=True, BN=bn, BK=bk, RSUB=rsub)
    sig = {k: v for k, v in SIG.items() if v != "constexpr"}
    r = report(fp8_gemm._fp8_gemv_kernel, sig, consts, warps, 2, 1)
    # report() counts FP4 bytes (two codes a byte): an FP8 tile of BN x BK is BN·BK bytes
    r["instructions_per_byte"] = r["k_loop"] / (bn * bk / (32 * warps)) if r["k_loop"] else None
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", default=[],
                    help="BN,BK,warps,RSUB (repeatable); default: the default tiles of each shape")
    ap.add_argument("--sms", type=int, default=132)
    ap.add_argument("--rsub", type=int, default=None,
                    help="the default launches with this many sub-tiles (1: the rule before sub-tiles); "
                         "default fp8_gemm.GEMV_RSUB")
    a = ap.parse_args(argv)
    for name, (N, K, per_sm) in SHAPES.items():
        if a.variant:
            launches = [tuple(int(v) for v in text.split(",")) for text in a.variant]
        else:
            cfg = fp8_gemm.gemv_launch(N, K, 128, a.sms, per_sm, rsub=a.rsub or fp8_gemm.GEMV_RSUB)
            launches = [(cfg["BN"], cfg["BK"], cfg["num_warps"], cfg["RSUB"])]
        for bn, bk, warps, rsub in launches:
            r = count(N, K, bn, bk, warps, rsub)
            print(f"{name:26s} {N:6d}x{K:<5d} BN {bn:2d} BK {bk:4d} warps {warps} RSUB {rsub}: "
                  f"{r['registers']:3d} registers, {r['spill_bytes']} B spilled, K loop {r['k_loop']} SASS = "
                  f"{r['instructions_per_byte']:.2f} per weight byte", flush=True)


if __name__ == "__main__":
    main()
