"""The decode step's routed experts in the model dtype (`dsv4.kernels.moe_gemv`, bf16 weights) at the
bench preset's shape (16 experts of 512 x 1024, top-2) for 1 and 4 tokens: the default launch against
a few tile/warp variants. Each variant is checked against the float64 twin (`ops.moe_experts_loop`) and
timed from CUDA-graph replay (median, `triton.testing.do_bench_cudagraph`), every call on another copy
of the experts (>= 256 MB of copies) so that weights come from HBM as in a decode step. Prints µs per
call and the GB/s of the expert rows read.

    python3 bench/probe_moe_gemv.py [--out probe_moe_gemv.json]
    TRITON_INTERPRET=1 python3 bench/probe_moe_gemv.py --smoke      # CPU: tiny shapes, correctness only
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsv4 import ops  # noqa: E402
from dsv4.kernels import moe_gemv as kern  # noqa: E402

HBM = 4.3e12
COLD_BYTES = 256 << 20
VARIANTS = [None, dict(bn=8, bk=256, warps=4), dict(bn=4, bk=256), dict(bn=2, bk=512), dict(bn=4, bk=512), dict(bn=2, bk=256),
            dict(bn=4, bk=256, warps=2), dict(bn=2, bk=512, warps=2), dict(bn=8, bk=256, bn_down=4),
            dict(bn=4, bk=512, warps=8), dict(bn=1, bk=1024)]


@torch.no_grad()
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    smoke = args.smoke or not torch.cuda.is_available()
    dev = torch.device("cpu" if smoke else "cuda")
    dt = torch.float32 if smoke else torch.bfloat16
    E, I, D, K = (4, 32, 64, 2) if smoke else (16, 512, 1024, 2)
    copies = 1 if smoke else max(1, COLD_BYTES // (3 * E * I * D * 2))
    torch.manual_seed(0)
    experts = [(torch.randn(E, I, D, device=dev, dtype=dt) / D ** 0.5, torch.randn(E, D, I, device=dev, dtype=dt) / I ** 0.5,
                torch.randn(E, I, D, device=dev, dtype=dt) / D ** 0.5) for _ in range(copies)]
    rows = []
    for N in (1, 4):
        x = torch.randn(N, D, device=dev, dtype=dt)
        idx = torch.stack([torch.randperm(E, device=dev)[:K] for _ in range(N)])
        w = torch.rand(N, K, device=dev, dtype=torch.float32)
        w1, w2, w3 = experts[0]
        ref = ops.moe_experts_loop(x.double(), idx, w.double(), w1.double(), w2.double(), w3.double(), 10.0)
        read = len(set(idx.flatten().tolist())) * 3 * I * D * 2
        for v in VARIANTS:
            def one(e, v=v):
                return kern.experts_gemv(x, idx, w, e[0], e[1], e[2], 10.0, **(v or {}))
            y = one(experts[0])
            err = float((y.double() - ref).abs().max() / ref.abs().max())
            row = {"tokens": N, "launch": v or "default", "err": err}
            if not smoke:
                import triton.testing
                us = 1e3 * triton.testing.do_bench_cudagraph(lambda: [one(e) for e in experts], rep=50,
                                                             return_mode="median") / len(experts)
                row.update(us=us, gbs=read / (us * 1e-6) / 1e9)
            rows.append(row)
            print(f"tokens {N} {json.dumps(row['launch']):45s} " + (f"{row['us']:7.2f} us {row['gbs']:6.0f} GB/s  "
                                                                   if not smoke else "") + f"err {err:.1e}", flush=True)
    if args.out:
        meta = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if not smoke else "cpu",
                "shape": dict(E=E, I=I, D=D, K=K)}
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
