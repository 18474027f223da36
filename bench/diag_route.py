"""The router kernel against its twin on CUDA at scale: index mismatches and weight/affinity errors
for random logits (fp32), per score function; prints where they differ.

    python3 bench/diag_route.py
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dsv4 import ops  # noqa: E402
from dsv4.kernels import router  # noqa: E402

torch.manual_seed(0)
for func in ("sqrtsoftplus", "sigmoid", "softmax"):
    for E, K in ((8, 2), (16, 2), (256, 6)):
        logits = torch.randn(100000, E, device="cuda") * 2
        bias = torch.randn(E, device="cuda") * 0.1
        w0, i0, s0 = ops.route_torch(logits, bias, None, None, K, func, True, 1.5)
        w1, i1, s1 = router.route(logits, bias, None, None, K, func, True, 1.5)
        same_set = (i0.sort(-1).values == i1.sort(-1).values).all(-1)
        print(f"{func:13s} E={E:3d} K={K}: rows with another expert set {int((~same_set).sum())}, "
              f"same order {bool((i0 == i1).all())}, affinities bitwise equal {bool(torch.equal(s0, s1))}, "
              f"max rel affinity err "
              f"{float(((s1 - s0).abs() / s0.abs().clamp_min(1e-30)).max()):.2e}, max weight err "
              f"{float((w1 - w0)[same_set].abs().max()):.2e}")
