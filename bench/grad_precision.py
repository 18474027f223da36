"""How far fp32 gradients of a training step are from float64, through the PyTorch twins and through the
Triton kernels (`ops.set_backend`), per parameter, over several sets of token ids: the tiny preset with
every layer type, MTP and the index loss on (the loss of `tests/test_kernels.py`'s training-step test).
It shows which gradients two fp32 implementations cannot be expected to agree on (sums with cancellation,
such as the mHC scales': 3 values a site summed over every token). CPU: kernels under the interpreter.

    TRITON_INTERPRET=1 python3 bench/grad_precision.py [--seeds 9] [--top 4]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if "TRITON_INTERPRET" not in os.environ and not os.path.exists("/dev/nvidia0"):   # (read when triton loads)
    os.environ["TRITON_INTERPRET"] = "1"
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import random_model  # noqa: E402
from dsv4 import ops  # noqa: E402


def grads(ids: torch.Tensor, backend: str, dtype: torch.dtype, device) -> dict:
    model = random_model("tiny", seed=4).to(device, dtype)
    for m in model.modules():
        if hasattr(m, "index_loss"):
            m.index_loss = True
    ops.set_backend(backend)
    try:
        logits, h, aux = model(ids, return_hidden=True, return_aux=True)
        mtp = model.mtp_logits(h[:, :-1], ids[:, 1:])
        kls = [a.index_kl[0] for a in aux if a.index_kl is not None]
        loss = (torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).to(dtype), ids[:, 1:].flatten())
                + torch.nn.functional.cross_entropy(mtp[:, :-1].flatten(0, 1).to(dtype), ids[:, 2:].flatten())
                + 0.1 * torch.stack(kls).sum())
        loss.backward()
    finally:
        ops.set_backend(None)
    return {n: p.grad.detach().double().cpu() for n, p in model.named_parameters() if p.grad is not None}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=9, help="sets of token ids")
    ap.add_argument("--top", type=int, default=4, help="parameters shown per set, largest kernel-twin gap first")
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    worst: dict[str, list] = {}
    for seed in range(a.seeds):
        ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(seed)).to(device)
        g64 = grads(ids, "torch", torch.float64, device)
        twin = grads(ids, "torch", torch.float32, device)
        kern = grads(ids, "triton", torch.float32, device)
        rows = sorted(((rel(kern[n], twin[n]), rel(twin[n], g64[n]), rel(kern[n], g64[n]), n)
                       for n in g64 if n in twin and n in kern and g64[n].norm() > 0), reverse=True)
        for r in rows:
            w = worst.setdefault(r[3], [0.0, 0.0, 0.0])
            worst[r[3]] = [max(x, y) for x, y in zip(w, r[:3])]
        for kt, tf, kf, name in rows[:a.top]:
            print(f"ids {seed}: kernels-twin {kt:.2e}  twin-f64 {tf:.2e}  kernels-f64 {kf:.2e}  {name}", flush=True)
    print("largest over all sets (kernels-twin, twin-f64, kernels-f64):")
    for name, w in sorted(worst.items(), key=lambda kv: -kv[1][0])[:2 * a.top]:
        print(f"  {w[0]:.2e} {w[1]:.2e} {w[2]:.2e}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
