"""Whether selection ties explain a whole-model difference between the kernels and the twins: for the
input where they differ, the twins against themselves, the model with dense index selection (every
visible entry, no top-k), and the twins with top-k ties broken by lowest index (as the kernel does).

    python3 bench/diag_model_ties.py
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import random_model  # noqa: E402
from dsv4 import ops  # noqa: E402
from dsv4.attention import Attention  # noqa: E402


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def topk_lowest_index(q, k, w, lo, hi, topk, k_rows=None):
    """index_topk_torch with ties at the threshold taken by lowest index (a stable descending sort)."""
    import dsv4.ops as o
    s = o.index_scores(q, k, w, k_rows)
    C = s.shape[-1]
    pos = torch.arange(C, device=s.device)
    vis = (pos >= lo.unsqueeze(-1)) & (pos < hi.unsqueeze(-1))
    s = torch.where(vis, s.float(), float("-inf"))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :min(topk, C)]
    ok = torch.gather(vis, -1, order)
    return torch.where(ok, order, -1)


@torch.no_grad()
def main():
    model = random_model("tiny", seed=3).to("cuda")
    ids = torch.randint(0, model.config.vocab_size, (2, 140), generator=torch.Generator().manual_seed(0)).cuda()
    ops.set_backend("torch")
    want = model(ids)
    print("twins against twins:", rel(model(ids), want))
    ops.set_backend("triton")
    print("kernels against twins:", rel(model(ids), want))
    real = ops.index_topk.impls["torch"]
    ops.index_topk.impls["torch"] = topk_lowest_index
    ops.index_topk._fns.clear()
    ops.set_backend("torch")
    want_low = model(ids)
    ops.set_backend("triton")
    print("kernels against twins with lowest-index ties:", rel(model(ids), want_low),
          "| twins with lowest-index ties against twins:", rel(want_low, want))
    ops.index_topk.impls["torch"] = real
    ops.index_topk._fns.clear()
    for m in model.modules():
        if isinstance(m, Attention):
            m.index_mode = "dense"
    ops.set_backend("torch")
    want_d = model(ids)
    ops.set_backend("triton")
    print("dense index mode, kernels against twins:", rel(model(ids), want_d))
    ops.set_backend(None)


if __name__ == "__main__":
    main()
