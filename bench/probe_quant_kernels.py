"""Launch variants of the quantised kernels at V4-Flash decode shapes, timed from CUDA-graph replay.

For the routed experts (256 of 4096 x 2048 in FP4, top-6) at M = 1 and 32 tokens: the per-pair GEMV path
under several tile configurations and the tiled path, each checked against the PyTorch twin, with the
weight bytes of the used experts per second (the decode roofline: H200 ~4.3 TB/s). For the FP8 GEMM at
the layer's shapes: M = 1 and 32. Graph replay leaves out Python launch cost, as a decode step under
`dsv4.graphs` does. Prints the fastest GEMV configuration; `--out` writes everything as JSON.

    python3 bench/probe_quant_kernels.py --out probe.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_flash_shaped import fp8_shapes, random_fp4_experts, random_fp8  # noqa: E402
from dsv4 import ops  # noqa: E402
from dsv4.commands.convert import random_like_config  # noqa: E402
from dsv4.kernels import fp4_moe  # noqa: E402
from dsv4.kernels.fp8_gemm import fp8_linear  # noqa: E402

HBM = 4.3e12


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def graph_us(fn) -> float:
    return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=30)


@torch.no_grad()
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,32")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    cfg = random_like_config("deepseek-v4-flash", layers=1, mtp=0, experts=None)
    E, D, I, K = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    ws = random_fp4_experts(E, D, I, dev)
    expert_bytes = 3 * I * D // 2 + 3 * I * D // 32
    # configurations without register spills on sm90 (ptxas -v of the compiled kernels)
    variants = [dict(BN=bn, BK=bk, num_warps=w, num_stages=st)
                for bn, bk, w, st in [(8, 256, 4, 2), (8, 512, 4, 2), (16, 256, 4, 2), (16, 512, 8, 2),
                                      (4, 512, 4, 2), (8, 256, 2, 2), (8, 256, 4, 3), (16, 256, 8, 2)]]
    res = {"fp4": {}, "fp8": {}, "shape": dict(E=E, D=D, I=I, topk=K)}
    default = dict(fp4_moe.TILES["gemv"])
    for M in (int(t) for t in args.tokens.split(",")):
        g = torch.Generator(device=dev).manual_seed(M)
        x = torch.randn(M, D, device=dev, dtype=torch.bfloat16, generator=g)
        idx = torch.rand(M, E, device=dev, generator=g).argsort(-1)[:, :K].contiguous()
        weight = torch.rand(M, K, device=dev, generator=g)
        used = int(idx.unique().numel())
        twin = ops.fp4_experts_torch(x, idx, weight, *ws, cfg.swiglu_limit)
        rows = []
        for path, var in [("dot", None)] + [("gemv", v) for v in variants]:
            if var is not None:
                fp4_moe.TILES["gemv"] = var
            fn = lambda: fp4_moe._fp4_moe(x, idx, weight, *ws, cfg.swiglu_limit, path=path)  # noqa: E731
            try:
                err = rel(fn(), twin)
                us = graph_us(fn)
            except Exception as exc:   # a configuration that does not compile or fit: recorded, skipped
                rows.append({"path": path, "cfg": var, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
                continue
            rows.append({"path": path, "cfg": var, "us": us, "rel_err_vs_twin": err,
                         "GBps": used * expert_bytes / (us * 1e-6) / 1e9,
                         "roofline_us": used * expert_bytes / HBM * 1e6})
            print(f"fp4 M={M:3d} {path:4s} {var}: {us:8.1f} us, {rows[-1]['GBps']:7.1f} GB/s over {used} experts "
                  f"(roofline {rows[-1]['roofline_us']:.1f} us), rel err vs twin {err:.1e}", flush=True)
        fp4_moe.TILES["gemv"] = default
        ok = [r for r in rows if r["path"] == "gemv" and "us" in r and r["rel_err_vs_twin"] < 2e-2]
        best = min(ok, key=lambda r: r["us"]) if ok else None
        res["fp4"][f"M={M}"] = {"experts_used": used, "rows": rows, "best_gemv": best}
        if best:
            print(f"fp4 M={M}: best gemv {best['cfg']} {best['us']:.1f} us", flush=True)
    # one configuration for every M: the smallest total time over the token counts measured
    totals = {}
    for key, r in res["fp4"].items():
        for row in r["rows"]:
            if row["path"] == "gemv" and "us" in row and row["rel_err_vs_twin"] < 2e-2:
                totals.setdefault(json.dumps(row["cfg"], sort_keys=True), []).append(row["us"])
    n = len(res["fp4"])
    full = {k: sum(v) for k, v in totals.items() if len(v) == n}
    res["best_gemv"] = json.loads(min(full, key=full.get)) if full else None
    print("best gemv over all M:", res["best_gemv"], flush=True)
    # prefill-sized M: the tiled kernels against dequantise + grouped GEMMs (eager: one host read)
    M = 8192
    x = torch.randn(M, D, device=dev, dtype=torch.bfloat16)
    idx = torch.rand(M, E, device=dev).argsort(-1)[:, :K].contiguous()
    weight = torch.rand(M, K, device=dev)
    base = fp4_moe._fp4_moe(x, idx, weight, *ws, cfg.swiglu_limit, path="dot")
    runs = {"dot": lambda: fp4_moe._fp4_moe(x, idx, weight, *ws, cfg.swiglu_limit, path="dot"),
            "dequant": lambda: ops.fp4_experts_dequant(x, idx, weight, *ws, cfg.swiglu_limit)}
    for path, fn in runs.items():
        ms = triton.testing.do_bench(fn, warmup=2, rep=200)
        res["fp4"][f"M={M} {path}"] = {"ms": ms, "TFLOPs": 2 * 3 * M * K * I * D / (ms * 1e-3) / 1e12,
                                        "rel_vs_dot": rel(fn(), base)}
        print(f"fp4 M={M} {path:7s}: {ms:8.2f} ms, {res['fp4'][f'M={M} {path}']['TFLOPs']:6.1f} TFLOP/s, "
              f"rel vs dot {res['fp4'][f'M={M} {path}']['rel_vs_dot']:.1e}", flush=True)
    for name, (N, Kd) in fp8_shapes(cfg).items():
        w, s = random_fp8(N, Kd, dev)
        for M in (1, 32):
            x = torch.randn(M, Kd, device=dev, dtype=torch.bfloat16)
            us = graph_us(lambda: fp8_linear(x, w, s))
            bf = torch.randn(N, Kd, device=dev, dtype=torch.bfloat16)
            us_bf16 = graph_us(lambda: x @ bf.t())
            res["fp8"][f"{name} {N}x{Kd} M={M}"] = {"us": us, "GBps": (N * Kd + s.numel()) / (us * 1e-6) / 1e9,
                                                     "bf16_matmul_us": us_bf16}
            print(f"fp8 {name:13s} {N}x{Kd} M={M:3d}: {us:7.1f} us ({res['fp8'][f'{name} {N}x{Kd} M={M}']['GBps']:7.1f}"
                  f" GB/s); bf16 cuBLAS of the same shape {us_bf16:7.1f} us", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
