"""Host cost of one `MuonAdamW.step()` on a model's parameters: the ATen operations it issues (on a GPU each
is at least one kernel launch), the CUDA kernels it launches, and its time.

    python bench/bench_optim.py                            # `bench` preset; CPU, and CUDA when present
    python bench/bench_optim.py --preset tiny --device cpu --steps 20
    python bench/bench_optim.py --ns-dtype fp32 --top 12 --out optim.json

The parameters are those of `Transformer(preset(...))` in fp32 (the trainer's master weights), grouped and
wrapped by `dsv4.train.build_optimizer` as in training, each with a fixed random gradient. Rows:
  ops       ATen operations per step that are not views, counted by a dispatch mode in a separate step
            (a foreach op counts once; on a GPU it launches one kernel per chunk of its tensors)
  kernels   CUDA kernels and copies per step (torch.profiler), CUDA only
  host ms   time until `step()` returns: on CUDA the host's time issuing the launches
  wall ms   time until the device has finished too (median over `--steps` steps after one warm-up)
  NS TFLOP  the step's Newton–Schulz matmul FLOPs (`newton_schulz_flops`), and per second of wall time
On the CPU host and wall are the same and include the arithmetic, which dominates at the `bench` size:
the CPU shows the op count and, with `--preset tiny`, the Python and dispatch cost.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dsv4.config import preset
from dsv4.model import Transformer
from dsv4.train import TrainConfig, build_optimizer


class CountOps(TorchDispatchMode):
    """Counts the ATen operations issued under it, views apart (they launch nothing)."""

    def __init__(self):
        super().__init__()
        self.ops, self.views = Counter(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.is_view:
            self.views += 1
        else:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def build(preset_name: str, device: str, ns_dtype: str, optimizer: str):
    cfg = preset(preset_name)
    with torch.device(device):
        model = Transformer(cfg)
    g = torch.Generator(device).manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, device=device) * 1e-3
    opt = build_optimizer(model, TrainConfig(model=cfg, muon_ns_dtype=ns_dtype, optimizer=optimizer))
    opt.set_lr(1e-4)
    return model, opt


def newton_schulz_flops(opt) -> float:
    """Matmul FLOPs of one step's Newton–Schulz: per stack of b matrices k × K (k = min(n, m)), each of the
    iterations computes A = XXᵀ (2bk²K), bA + cA² (2bk³) and PX (2bk²K)."""
    from dsv4.optim import NS_COEFFS, _matrices
    total = 0
    for group in opt.param_groups:
        if group["kind"] != "muon":
            continue
        for p in group["params"]:
            b, n, m = _matrices(p, group["batch_dims"]).shape
            k, K = min(n, m), max(n, m)
            total += len(NS_COEFFS) * (4 * b * k * k * K + 2 * b * k ** 3)
    return float(total)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(preset_name: str, device: str, ns_dtype: str, optimizer: str, steps: int) -> dict:
    model, opt = build(preset_name, device, ns_dtype, optimizer)
    opt.step()                                                   # warm-up (and lazily built handles)
    sync(device)
    with CountOps() as count:
        opt.step()
    sync(device)
    kernels = None
    if device.startswith("cuda"):
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            opt.step()
            sync(device)
        kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    host, wall = [], []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        opt.step()
        t1 = time.perf_counter()
        sync(device)
        t2 = time.perf_counter()
        host.append(1e3 * (t1 - t0))
        wall.append(1e3 * (t2 - t0))
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    return {"device": device, "preset": preset_name, "ns_dtype": ns_dtype, "optimizer": optimizer,
            "params": n_params, "ops": sum(count.ops.values()), "views": count.views, "kernels": kernels,
            "host_ms": statistics.median(host), "wall_ms": statistics.median(wall),
            "ns_tflop": newton_schulz_flops(opt) / 1e12,
            "top_ops": count.ops.most_common()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--device", default="all", help="cpu, cuda, cuda:N or all (CPU, and CUDA when present)")
    ap.add_argument("--ns-dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--optimizer", default="muon", choices=("muon", "adamw"))
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    ap.add_argument("--top", type=int, default=0, help="also list the N most frequent ops")
    ap.add_argument("--out", help="write the rows as JSON")
    args = ap.parse_args()
    devices = [args.device] if args.device != "all" else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = [measure(args.preset, d, args.ns_dtype, args.optimizer, args.steps) for d in devices]
    print(f"MuonAdamW.step() on `{args.preset}` ({rows[0]['params']} tensors), Newton–Schulz in {args.ns_dtype}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"Newton–Schulz per step: {rows[0]['ns_tflop']:.2f} TFLOP of matmuls")
    print(f"{'device':8} {'ops':>6} {'views':>6} {'kernels':>8} {'host ms':>9} {'wall ms':>9} {'NS TFLOP/s':>11}")
    for r in rows:
        kernels = "-" if r["kernels"] is None else str(r["kernels"])
        rate = r["ns_tflop"] / (r["wall_ms"] / 1e3)
        print(f"{r['device']:8} {r['ops']:6d} {r['views']:6d} {kernels:>8} {r['host_ms']:9.2f} {r['wall_ms']:9.2f} "
              f"{rate:11.1f}")
    if args.top:
        print("most frequent ops:", ", ".join(f"{k} {v}" for k, v in rows[0]["top_ops"][:args.top]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
