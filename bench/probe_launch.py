"""Host cost of a kernel launch from Python on this machine: a small PyTorch op, a Triton kernel with few
arguments and one with the ~30 arguments and constexprs of our larger kernels, each issued N times
back to back (the GPU work is a few bytes, so the time is the host's). What an eager training step
pays per launch; a CUDA-graph replay pays none of it.

    python bench/probe_launch.py [--n 2000] [--out probe_launch.json]
    python bench/probe_launch.py --keys      # any machine: the launch cache's key alone, both forms
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import triton
import triton.language as tl


@triton.jit
def _small(X, Y, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + i, tl.load(X + i, mask=i < n) + 1.0, mask=i < n)


@triton.jit
def _wide(X, Y, A0, A1, A2, A3, A4, A5, A6, A7, s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, n, eps,
          C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr, C4: tl.constexpr,
          BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + i, tl.load(X + i, mask=i < n) + eps, mask=i < n)


def per_launch_us(fn, n: int) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = time.perf_counter() - t
    torch.cuda.synchronize()
    return host / n * 1e6


def key_us(n: int) -> dict:
    """µs of host time to build the launch cache's key of 30 arguments (10 tensors, 15 ints, 3 floats, 2
    None, as a large kernel of dsv4/kernels takes), as 30 calls of `spec_key` (the earlier form) and as
    `spec_keys` (the form `FastLaunch` uses). CPU tensors: the key reads only dtype and address."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dsv4.kernels.launch import spec_key, spec_keys
    args = [torch.empty(64, dtype=torch.bfloat16) for _ in range(10)]
    args += [4096, 1, 128, 7, 8192, 16, 2048, 1, 512, 3, 64, 1024, 8, 4096, 32, 0.5, 1e-6, 2.0, None, None]
    assert spec_keys(args) == tuple(map(spec_key, args))
    out = {}
    for name, fn in (("30 calls of spec_key", lambda: tuple(map(spec_key, args))), ("spec_keys", lambda: spec_keys(args))):
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(n):
                fn()
            best = min(best, (time.perf_counter() - t) / n * 1e6)
        out[name] = best
        print(f"launch key, {name:22s} {best:6.2f} µs (host, best of 5 × {n})")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--keys", action="store_true", help="only the launch key's host time (no GPU needed)")
    ap.add_argument("--out", default="probe_launch.json")
    args = ap.parse_args()
    if args.keys:
        key_us(20 * args.n)
        return 0
    x = torch.randn(256, device="cuda")
    y = torch.empty_like(x)
    a = [torch.randn(16, device="cuda") for _ in range(8)]
    rows = {
        "torch.add (out=)": per_launch_us(lambda: torch.add(x, 1.0, out=y), args.n),
        "torch.add (new tensor)": per_launch_us(lambda: x + 1.0, args.n),
        "Triton, 3 arguments": per_launch_us(lambda: _small[(1,)](x, y, 256, BLOCK=256), args.n),
        "Triton, 30 arguments": per_launch_us(
            lambda: _wide[(1,)](x, y, *a, *range(10), 256, 1e-6, C0=1, C1=2, C2=3, C3=True, C4=False, BLOCK=256),
            args.n),
    }
    # the same 30-argument kernel without the JIT's per-call work (argument binding and specialisation,
    # cache key, knobs): the compiled kernel's own launcher, then its C entry point with everything
    # precomputed (what a launch cache keyed on the arguments' specialisation could reach)
    wide = (x, y, *a, *range(10), 256, 1e-6)
    const = dict(C0=1, C1=2, C2=3, C3=True, C4=False, BLOCK=256)
    compiled = _wide[(1,)](*wide, **const)
    full = (*wide, *const.values())
    runner = compiled[(1, 1, 1)]
    rows["Triton, 30 arguments, compiled[grid](...)"] = per_launch_us(lambda: runner(*full), args.n)
    stream = torch.cuda.current_stream().cuda_stream
    fn, meta = compiled.function, compiled.packed_metadata
    rows["Triton, 30 arguments, compiled.run (C launcher)"] = per_launch_us(
        lambda: compiled.run(1, 1, 1, stream, fn, meta, None, None, None, *full), args.n)
    # the whole path of dsv4's launch cache (`FastLaunch`: the key of every argument, the lookup, the
    # launcher), as every kernel of dsv4/kernels is launched
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dsv4.kernels.launch import FastLaunch
    cached = FastLaunch(_wide)
    rows["Triton, 30 arguments, dsv4 launch cache (FastLaunch)"] = per_launch_us(
        lambda: cached[(1,)](*wide, **const), args.n)
    # PDL launch option as dsv4/kernels launch every kernel on sm90+
    if torch.cuda.get_device_capability() >= (9, 0):
        rows["Triton, 30 arguments, launch_pdl=True"] = per_launch_us(
            lambda: _wide[(1,)](*wide, **const, launch_pdl=True), args.n)
    xg = x.detach().requires_grad_()
    rows["torch.mul + backward (autograd)"] = per_launch_us(lambda: (xg * 2.0).sum().backward(), args.n // 4)
    for k, v in rows.items():
        print(f"{k:36s} {v:7.1f} µs per call (host)")
    json.dump({"torch": torch.__version__, "triton": triton.__version__, "device": torch.cuda.get_device_name(),
               "n": args.n, "us_per_call": rows}, open(args.out, "w"), indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
