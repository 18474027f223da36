"""Which primitive moves the whole model's output: the full forward of a small model with every layer
type (fp32, CUDA) through all Triton kernels against the twins, then with each primitive in turn sent
back to its twin (`DSV4_OPS`-style overrides through `ops.set_backend`); prints the relative error of
each run, for several random inputs.

    python3 bench/diag_model_kernels.py
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import random_model  # noqa: E402
from dsv4 import ops  # noqa: E402


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@torch.no_grad()
def main():
    model = random_model("tiny", seed=3).to("cuda")
    names = [n for n, p in ops.PRIMITIVES.items() if "triton" in p.impls]
    for seed in range(3):
        ids = torch.randint(0, model.config.vocab_size, (2, 140), generator=torch.Generator().manual_seed(seed)).cuda()
        ops.set_backend("torch")
        want = model(ids)
        ops.set_backend("triton")
        row = {"all kernels": rel(model(ids), want)}
        for n in names:
            ops.set_backend({"*": "triton", n: "torch"})
            row[f"{n}=torch"] = rel(model(ids), want)
        ops.set_backend(None)
        print(f"ids seed {seed}: " + ", ".join(f"{k} {v:.1e}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
