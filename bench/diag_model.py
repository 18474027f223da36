"""Diagnostics of the whole model on the GPU: kernels against twins (fp32, a small model with every
layer type, ids from seed 0), when the two disagree.

    python3 bench/diag_model.py primitives   # each primitive in turn sent back to its twin, 3 inputs
    python3 bench/diag_model.py ties         # twins twice; twins with top-k ties by a stable sort; dense selection
    python3 bench/diag_model.py repeat       # twins twice, kernels twice, and the index top-k / router
                                             # choices of both paths compared call by call (sets)
    python3 bench/diag_model.py diverge      # twins twice, hooks on every module: where the two runs part
    --deterministic                          # PyTorch's deterministic algorithms (warns at the ops without)
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import random_model  # noqa: E402
from dsv4 import ops  # noqa: E402
from dsv4.attention import Attention  # noqa: E402


DEV = "cuda"


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def ids_for(model, seed: int) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (2, 140), generator=torch.Generator().manual_seed(seed)).to(DEV)


def run(model, ids, backend):
    ops.set_backend(backend)
    try:
        return model(ids)
    finally:
        ops.set_backend(None)


def primitives(model):
    names = [n for n, p in ops.PRIMITIVES.items() if "triton" in p.impls]
    for seed in range(3):
        ids = ids_for(model, seed)
        want = run(model, ids, "torch")
        row = {"all kernels": rel(run(model, ids, "triton"), want)}
        for n in names:
            row[f"{n}=torch"] = rel(run(model, ids, {"*": "triton", n: "torch"}), want)
        print(f"ids seed {seed}: " + ", ".join(f"{k} {v:.1e}" for k, v in row.items()), flush=True)


def topk_stable(q, k, w, lo, hi, topk, k_rows=None):
    """The twin's index top-k with ties at the threshold by lowest index through a stable sort (which
    orders −0 below +0 on CUDA, where the radix select now takes them as equal)."""
    s = ops.index_scores(q, k, w, k_rows)
    pos = torch.arange(s.shape[-1], device=s.device)
    vis = (pos >= lo.unsqueeze(-1)) & (pos < hi.unsqueeze(-1))
    s = torch.where(vis, s.float(), float("-inf"))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :min(topk, s.shape[-1])]
    return torch.where(torch.gather(vis, -1, order), order, -1)


def ties(model):
    ids = ids_for(model, 0)
    want = run(model, ids, "torch")
    print("twins against twins:", rel(run(model, ids, "torch"), want))
    print("kernels against twins:", rel(run(model, ids, "triton"), want))
    real = ops.index_topk.impls["torch"]
    ops.index_topk.impls["torch"] = topk_stable
    ops.index_topk._fns.clear()
    try:
        want_stable = run(model, ids, "torch")
    finally:
        ops.index_topk.impls["torch"] = real
        ops.index_topk._fns.clear()
    print("kernels against twins with stable-sort ties:", rel(run(model, ids, "triton"), want_stable),
          "| those twins against the twins:", rel(want_stable, want))
    for m in model.modules():
        if isinstance(m, Attention):
            m.index_mode = "dense"
    print("dense index mode, kernels against twins:", rel(run(model, ids, "triton"), run(model, ids, "torch")))


def first_divergence(model):
    """The twin path three times with a hook on every module and primitive: the final outputs' pairwise
    differences, the number of outputs each run recorded, and the first outputs (in the order they
    finished) that differ between runs 0 and 1 — where the difference enters."""
    ids = ids_for(model, 0)
    outs = {0: [], 1: [], 2: []}
    cur = [0]

    def hook(mod, inp, out, name=None):
        t = out[0] if isinstance(out, tuple) else out
        if isinstance(t, torch.Tensor):
            ins = [tuple(x.shape) for x in inp if isinstance(x, torch.Tensor)]
            outs[cur[0]].append((name, t.detach().clone(), ins))

    handles = [m.register_forward_hook(lambda mod, i, o, n=n: hook(mod, i, o, n)) for n, m in model.named_modules()]
    real = ops.Primitive.__call__

    def spy(self, *a, **k):        # every primitive's output too, in call order
        out = real(self, *a, **k)
        hook(None, a, out, f"ops.{self.name}")
        return out

    ops.Primitive.__call__ = spy
    final = {}
    try:
        for r in (0, 1, 2):
            cur[0] = r
            final[r] = run(model, ids, "torch")
    finally:
        ops.Primitive.__call__ = real
        for h in handles:
            h.remove()
    print(f"final: run0 vs run1 {rel(final[1], final[0]):.2e}, run1 vs run2 {rel(final[2], final[1]):.2e}, "
          f"run0 vs run2 {rel(final[2], final[0]):.2e}; outputs recorded {[len(outs[r]) for r in outs]}")
    shown = 0
    for i, ((n0, a, ia), (n1, b, ib)) in enumerate(zip(outs[0], outs[1])):
        if n0 != n1 or a.shape != b.shape:
            print(f"#{i}: the runs called different things here: {n0} {tuple(a.shape)} vs {n1} {tuple(b.shape)}")
            shown += 1
        elif not torch.equal(a, b):
            diff = (a.double() - b.double()).abs()
            where = diff.flatten(2).amax(-1) if diff.dim() > 2 else diff
            pos = (where > 0).nonzero()[:4].tolist()
            print(f"#{i} {n0 or 'model'} {tuple(a.shape)} {a.dtype} from inputs {ia}: max diff {float(diff.max()):.2e}, "
                  f"rel {rel(a, b):.2e}, |a| max {float(a.abs().max()):.2e}, |b| max {float(b.abs().max()):.2e}, "
                  f"first places {pos}; same as run 2: {torch.equal(b, outs[2][i][1]) if i < len(outs[2]) else '?'}")
            shown += 1
        if shown >= 8:
            break
    print(f"differing shown: {shown}")


def repeat(model):
    ids = ids_for(model, 0)
    chosen = {}
    real = ops.Primitive.__call__

    args = {}

    def spy(self, *a, **k):
        out = real(self, *a, **k)
        if self.name in ("index_topk", "route"):
            chosen.setdefault(self.name, []).append(out if self.name == "index_topk" else out[1])
            args.setdefault(self.name, []).append(a)
        return out

    ops.Primitive.__call__ = spy
    runs = {}
    try:
        for backend in ("torch", "triton"):
            for r in range(2):
                chosen.clear()
                args.clear()
                runs[backend, r] = (run(model, ids, backend), {k: list(v) for k, v in chosen.items()})
                if backend == "torch" and r == 0:
                    topk_args = list(args.get("index_topk", []))
    finally:
        ops.Primitive.__call__ = real
    (t0, c0), (t1, c1), (k0, d0) = runs["torch", 0], runs["torch", 1], runs["triton", 0]
    print("twins twice:", rel(t1, t0), "| kernels twice:", rel(runs["triton", 1][0], k0),
          "| kernels vs twins:", rel(k0, t0))
    for name in c0:
        for i, (a, b, c) in enumerate(zip(c0[name], c1[name], d0[name])):
            sa, sb, sc = (x.sort(-1).values for x in (a, b, c))
            bad = (sa != sc).any(-1)
            print(f"{name} call {i}: twin runs differ in {int((sa != sb).any(-1).sum())} rows, kernel vs twin in "
                  f"{int(bad.sum())} of {sa[..., 0].numel()}")
            if name == "index_topk" and bad.any():   # the scores where the two choices differ
                q, k, w, lo, hi, topk, *rest = topk_args[i]
                sc_all = ops.index_scores(q, k, w, rest[0] if rest else None)
                for row in bad.nonzero()[:3].tolist():
                    x, y = set(a[tuple(row)].tolist()), set(c[tuple(row)].tolist())
                    srow = sc_all[tuple(row)]
                    pth = sorted((srow[j].item() for j in x if j >= 0), reverse=True)
                    print(f"  row {row}: lo {int(lo[tuple(row)])} hi {int(hi[tuple(row)])}, P-th twin score "
                          f"{pth[-1] if pth else None!r}; twin only "
                          f"{[(j, srow[j].item().hex()) for j in sorted(x - y) if j >= 0][:6]}; kernel only "
                          f"{[(j, srow[j].item().hex()) for j in sorted(y - x) if j >= 0][:6]}; -1s twin "
                          f"{sum(j < 0 for j in x)} kernel {sum(j < 0 for j in y)}")


@torch.no_grad()
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["primitives", "ties", "repeat", "diverge"])
    ap.add_argument("--deterministic", action="store_true",
                    help="torch.use_deterministic_algorithms(True, warn_only=True): warns at each op without a "
                         "deterministic CUDA implementation (set CUBLAS_WORKSPACE_CONFIG=:4096:8)")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu with TRITON_INTERPRET=1 (a check of the script)")
    args = ap.parse_args(argv)
    global DEV
    DEV = args.device
    if args.deterministic:
        import warnings
        warnings.simplefilter("always")
        torch.use_deterministic_algorithms(True, warn_only=True)
    {"primitives": primitives, "ties": ties, "repeat": repeat, "diverge": first_divergence}[args.what](random_model("tiny", seed=3).to(DEV))


if __name__ == "__main__":
    main()
