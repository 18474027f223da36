"""What programmatic dependent launch (PDL) buys a decode-like chain of small kernels replayed from a CUDA
graph: 36 kernels per "layer" (24 small row kernels on a 4,096-vector, 12 bf16 GEMVs of 1-32 MB), each
reading the previous one's output.

    python bench/probe_pdl.py [--layers 4] [--out probe_pdl.json]

Variants (every kernel of a chain the same way):
* off:      plain launches (each kernel starts after the previous one has finished);
* wait:     launched with PDL, `gdc_wait` first (the launch overlaps the previous kernel's tail);
* trigger:  as wait, and `gdc_launch_dependents` right after the wait (the next kernel's programs are
            scheduled while this one runs; they wait at their own `gdc_wait`);
* prefetch: as trigger, and each GEMV program loads its first weight tile before its `gdc_wait` (the
            weights do not depend on the previous kernel).
* early:    `gdc_launch_dependents` before the wait: the next kernel's programs may be scheduled as soon as
            all of this kernel's are, so several small kernels' programs wait at once, in stream order
            (each wait still covers the previous kernel's completion and writes, hence all earlier ones).
* early-prefetch, early-prefetch2: early, and each GEMV program loads its first one or two weight tiles
            before its wait.
Each chain's output is checked against the plain chain's (bitwise: the same kernels in the same order).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@triton.jit
def _row_kernel(x_ptr, y_ptr, N, BLOCK: tl.constexpr, PDL: tl.constexpr, TRIGGER: tl.constexpr,
                EARLY: tl.constexpr):
    if EARLY:
        tl.extra.cuda.gdc_launch_dependents()
    if PDL:
        tl.extra.cuda.gdc_wait()
    if TRIGGER:
        tl.extra.cuda.gdc_launch_dependents()
    r = tl.arange(0, BLOCK)
    m = r < N
    x = tl.load(x_ptr + r, mask=m, other=0.0).to(tl.float32)
    y = x * tl.rsqrt(tl.sum(x * x, 0) / N + 1e-6)
    tl.store(y_ptr + r, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, BN: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr,
                 TRIGGER: tl.constexpr, PREFETCH: tl.constexpr, EARLY: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * K + rk[None, :]
    acc = tl.zeros((BN, BK), tl.float32)
    if EARLY:
        tl.extra.cuda.gdc_launch_dependents()
    if PREFETCH >= 1:
        w0 = tl.load(w_ptrs)
    if PREFETCH >= 2:
        w1 = tl.load(w_ptrs + BK, mask=(BK + rk < K)[None, :], other=0.0)
    if PDL:
        tl.extra.cuda.gdc_wait()
    if TRIGGER:
        tl.extra.cuda.gdc_launch_dependents()
    start = 0
    if PREFETCH >= 1:
        acc += w0.to(tl.float32) * tl.load(x_ptr + rk).to(tl.float32)[None, :]
        start = BK
    if PREFETCH >= 2:
        acc += w1.to(tl.float32) * tl.load(x_ptr + BK + rk, mask=BK + rk < K, other=0.0).to(tl.float32)[None, :]
        start = 2 * BK
    for k0 in range(start, K, BK):
        w = tl.load(w_ptrs + k0).to(tl.float32)
        acc += w * tl.load(x_ptr + k0 + rk).to(tl.float32)[None, :]
    tl.store(y_ptr + rn, tl.sum(acc, 1).to(y_ptr.dtype.element_ty))


# (PDL, trigger after the wait, weight tiles loaded before the wait, trigger before the wait)
VARIANTS = {"off": (False, False, 0, False), "wait": (True, False, 0, False), "trigger": (True, True, 0, False),
            "prefetch": (True, True, 1, False), "early": (True, False, 0, True),
            "early-prefetch": (True, False, 1, True), "early-prefetch2": (True, False, 2, True)}


def chain(x, weights, bufs, variant):
    pdl, trig, pre, early = VARIANTS[variant]
    opt = {"launch_pdl": True} if pdl else {}
    h = x
    for i, w in enumerate(weights):
        for _ in range(2):
            out = bufs[h.numel()].pop(0)
            bufs[h.numel()].append(out)
            _row_kernel[(1,)](h, out, h.numel(), BLOCK=triton.next_power_of_2(h.numel()), PDL=pdl, TRIGGER=trig,
                              EARLY=early, num_warps=4, **opt)
            h = out
        N, K = w.shape
        out = bufs[N].pop(0)
        bufs[N].append(out)
        _gemv_kernel[(N // 8,)](h, w, out, N, K, BN=8, BK=min(512, K), PDL=pdl, TRIGGER=trig, PREFETCH=pre,
                                EARLY=early, num_warps=4, **opt)
        h = out
    return h


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    D = 4096
    # per layer: GEMVs of 1-32 MB (bf16), as a V4-Flash layer's projections at batch 1
    # (each GEMV's input is the previous one's output)
    shapes = [(1024, 4096), (4096, 1024), (512, 4096), (4096, 512), (4096, 4096), (2048, 4096),
              (4096, 2048), (2048, 4096), (4096, 2048), (256, 4096), (4096, 256), (4096, 4096)]
    weights = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * k ** -0.5
               for _ in range(args.layers) for n, k in shapes]
    sizes = {D} | {n for n, _ in shapes} | {k for _, k in shapes}
    bufs = {s: [torch.empty(s, device=dev, dtype=torch.bfloat16) for _ in range(3)] for s in sizes}
    x = torch.randn(D, device=dev, dtype=torch.bfloat16)
    n_kernels = 3 * len(weights)
    wbytes = sum(w.numel() * 2 for w in weights)
    res = {"layers": args.layers, "kernels": n_kernels, "weight_bytes": wbytes, "rows": []}
    ref = None
    for variant in VARIANTS:
        row = {"variant": variant}
        try:
            out = chain(x, weights, bufs, variant).clone()
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                chain(x, weights, bufs, variant)
                torch.cuda.synchronize()
                with torch.cuda.graph(g, stream=s):
                    gout = chain(x, weights, bufs, variant)
            torch.cuda.current_stream().wait_stream(s)
            g.replay()
            torch.cuda.synchronize()
            if ref is None:
                ref = out
            row["equal_to_off"] = bool(torch.equal(out, ref)) and bool(torch.equal(gout[:out.numel()], ref))
            ms = triton.testing.do_bench(g.replay, warmup=50, rep=300, return_mode="median")
            row.update(ms=ms, us_per_kernel=ms * 1e3 / n_kernels, gbs=wbytes / ms / 1e6)
        except Exception as exc:  # noqa: BLE001 (reported; the next variant runs)
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        print(json.dumps(row), flush=True)
        res["rows"].append(row)
    from dsv4.runlog import describe_environment
    res["env"] = describe_environment(dev)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
