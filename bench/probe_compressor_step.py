"""The compressor's one-token decode step (`dsv4/kernels/compressor.py`, `_decode_step_kernel`) on its own:
µs per call at a position that completes a window (the step pools the window and shifts it into the
previous one) and at one that does not, for V4-Flash's two overlapping compressors of a CSA layer
(c = 512: the attention's, c = 128: the indexer's), with and without PDL. CUDA-graph medians (`triton.testing.do_bench_cudagraph`).

    python3 bench/probe_compressor_step.py --out probe_compressor_step.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dsv4.kernels import compressor, launch  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bmax", type=int, default=32, help="rows of the state (the cache's batch)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dev, M, calls = torch.device("cuda"), 4, 20
    rows = []
    for c, pos, pdl in itertools.product((512, 128), (3, 0), (True, False)):
        launch.ENABLED = pdl
        J, w = 2 * M, 2 * c
        g = torch.Generator(device=dev).manual_seed(c + pos)
        skv = torch.randn(a.bmax, J, w, device=dev, generator=g)
        ssc = torch.randn(a.bmax, J, w, device=dev, generator=g)
        kv, sc = torch.randn(1, 1, w, device=dev, generator=g), torch.randn(1, 1, w, device=dev, generator=g)
        ape = torch.randn(M, w, device=dev, generator=g)
        r, p = torch.tensor([5], device=dev), torch.tensor([pos], device=dev)

        def fn():
            for _ in range(calls):
                compressor.decode_step(skv, ssc, r, kv, sc, ape, p, M, True)
        fn()
        us = 1e3 * triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median") / calls
        row = dict(c=c, completes=pos % M == M - 1, pdl=pdl, us=us)
        rows.append(row)
        print(json.dumps(row), flush=True)
    launch.ENABLED = True
    if a.out:
        Path(a.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
