"""Run-to-run stability of the whole model on the GPU: the twins twice, the kernels twice, the kernels
against the twins, and the index top-k choices of both paths compared call by call (sets).

    python3 bench/diag_model_repeat.py
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
    ids = torch.randint(0, model.config.vocab_size, (2, 140), generator=torch.Generator().manual_seed(0)).cuda()
    chosen = {}
    real = ops.Primitive.__call__

    def spy(self, *a, **k):
        out = real(self, *a, **k)
        if self.name in ("index_topk", "route"):
            chosen.setdefault(self.name, []).append(out if self.name == "index_topk" else out[1])
        return out

    ops.Primitive.__call__ = spy
    runs = {}
    for backend in ("torch", "triton"):
        for r in range(2):
            ops.set_backend(backend)
            chosen.clear()
            runs[backend, r] = (model(ids), {k: list(v) for k, v in chosen.items()})
    ops.set_backend(None)
    ops.Primitive.__call__ = real
    (t0, c0), (t1, c1), (k0, d0) = runs["torch", 0], runs["torch", 1], runs["triton", 0]
    print("twins twice:", rel(t1, t0), "| kernels twice:", rel(runs["triton", 1][0], k0), "| kernels vs twins:", rel(k0, t0))
    for name in c0:
        for i, (a, b, c) in enumerate(zip(c0[name], c1[name], d0[name])):
            sa, sb, sc = (x.sort(-1).values for x in (a, b, c))
            print(f"{name} call {i}: twin runs differ in {int((sa != sb).any(-1).sum())} rows, kernel vs twin in "
                  f"{int((sa != sc).any(-1).sum())} of {sa[..., 0].numel()}")


if __name__ == "__main__":
    main()
