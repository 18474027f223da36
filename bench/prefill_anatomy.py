"""Where a host-bound prefill spends its launches: the `bench` model's cached prefill of one prompt on CUDA
(or with --train an eager bf16 training step, with --decode an eager decode step), every aten op and every Triton launch counted by the dsv4
line that issued it, the host synchronisations by line, the wall time (best of --repeats; and when the
call returned, before the final synchronisation) and a cProfile of the dsv4 functions by cumulative time.

    python bench/prefill_anatomy.py [--length 4096] [--train | --decode] [--out prefill_anatomy.json]

Counting runs in a separate call from timing (the dispatch hook costs host time of its own).
"""
from __future__ import annotations

import argparse
import collections
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from step_profile import capture, profile_once  # noqa: E402
from dsv4.cache import DecodeCache  # noqa: E402
from dsv4.config import preset  # noqa: E402
from dsv4.model import Transformer  # noqa: E402


def site(skip_kernels: bool = False) -> str:
    """The innermost frame in the dsv4 package (with skip_kernels: outside dsv4/kernels) as 'file:line fn'."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if "/dsv4/" in name and not (skip_kernels and "/dsv4/kernels/" in name):
            return f"{name.split('/dsv4/')[-1]}:{f.f_lineno} {f.f_code.co_name}"
        f = f.f_back
    return "?"


class CountOps(TorchDispatchMode):
    """Counts aten ops by issuing dsv4 line; views and allocations (no kernel) apart."""

    def __init__(self):
        super().__init__()
        self.ops, self.host_only = collections.Counter(), collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        hostish = func.is_view or name in ("aten::empty", "aten::empty_like", "aten::empty_strided", "aten::view",
                                           "aten::_unsafe_view", "aten::t", "aten::detach", "aten::alias")
        (self.host_only if hostish else self.ops)[(site(), name.removeprefix("aten::"))] += 1
        return func(*args, **(kwargs or {}))


def count_triton(fn) -> collections.Counter:
    """Runs fn with every Triton launch counted by (dsv4 caller outside the kernels package, kernel): those
    served by the launch cache (`FastLaunch.launch`) and those that go through the JIT (once each)."""
    from triton.runtime.jit import JITFunction
    from dsv4.kernels.launch import FastLaunch
    counts = collections.Counter()
    inside = [False]
    orig_run, orig_launch = JITFunction.run, FastLaunch.launch

    def run(self, *args, **kwargs):
        if not inside[0]:
            counts[(site(skip_kernels=True), self.fn.__name__)] += 1
        else:
            counts[("(through the JIT, not the launch cache)", self.fn.__name__)] += 1
        return orig_run(self, *args, **kwargs)

    def launch(self, grid, args, kwargs):
        counts[(site(skip_kernels=True), self.fn.fn.__name__)] += 1
        inside[0] = True
        try:
            return orig_launch(self, grid, args, kwargs)
        finally:
            inside[0] = False

    JITFunction.run, FastLaunch.launch = run, launch
    try:
        fn()
        torch.cuda.synchronize()
    finally:
        JITFunction.run, FastLaunch.launch = orig_run, orig_launch
    return counts


def by_line(counter, top: int) -> list:
    lines = collections.Counter()
    for (where, _), n in counter.items():
        lines[where] += n
    return lines.most_common(top)


def by_op(counter, top: int) -> list:
    ops = collections.Counter()
    for (_, op), n in counter.items():
        ops[op] += n
    return ops.most_common(top)


def by_package(st: pstats.Stats, top: int) -> tuple[list, list]:
    """cProfile totals grouped by where the function lives (dsv4 file, torch / triton package, C builtins):
    [(where, calls, own seconds)], and the top functions by own time [(name, calls, own seconds)]."""
    groups = collections.defaultdict(lambda: [0, 0.0])
    funcs = []
    for (fname, line, fn), (_, calls, own, _, _) in st.stats.items():
        if "/dsv4/" in fname:
            where = "dsv4/" + fname.split("/dsv4/")[-1]
        elif "site-packages/" in fname:
            where = "/".join(fname.split("site-packages/")[-1].split("/")[:2])
        else:
            where = "builtins" if fname == "~" else fname.rsplit("/", 1)[-1]
        groups[where][0] += calls
        groups[where][1] += own
        funcs.append((f"{where}:{line} {fn}", calls, own))
    return (sorted(((w, c, t) for w, (c, t) in groups.items()), key=lambda r: -r[2])[:top],
            sorted(funcs, key=lambda r: -r[2])[:top])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--train", action="store_true",
                    help="a bf16 training step (forward, next-token CE, backward) of --length tokens instead")
    ap.add_argument("--decode", action="store_true",
                    help="one eager decode step (batch 1) after a prompt of --length tokens instead")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--top", type=int, default=45)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    cfg = preset(args.preset)
    n = args.length
    if args.train:
        from bench_train import dsv4_step_fn
        prefill = dsv4_step_fn(cfg, dev, 1, n, torch.bfloat16, False)
    else:
        torch.manual_seed(0)
        model = Transformer(cfg).to(dev).to_dtype(torch.bfloat16).eval()
        model.pack_projections()
        ids = torch.randint(0, cfg.vocab_size, (1, n), device=dev)
        cache = DecodeCache(cfg, 1, n + 64, device=dev, dtype=torch.bfloat16)
        rows = torch.zeros(1, dtype=torch.long, device=dev)

        @torch.no_grad()
        def prefill():
            cache.reset(rows)
            return model(ids, cache=cache, rows=rows, last_only=True)

        if args.decode:
            prefill()
            start = cache.lengths.clone()

            @torch.no_grad()
            def prefill():        # (the step measured: one token after the prompt, the cache put back)
                cache.lengths.copy_(start)
                return model.decode_step(ids[:, :1], cache, rows)

    for _ in range(3):
        prefill()
    walls, issue = [], []
    for _ in range(args.repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        prefill()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0) * 1e3)
        issue.append((t1 - t0) * 1e3)
    table, busy, n_kernels = profile_once(prefill, rows=25)
    mode = CountOps()
    with mode:
        prefill()
    trit = count_triton(prefill)
    syncs = collections.Counter()
    for _, stack in capture(prefill, frames=40):
        frames = [f for f in stack if "/dsv4/" in f.filename]
        syncs[f"{frames[-1].filename.split('/dsv4/')[-1]}:{frames[-1].lineno}" if frames else "?"] += 1
    pr = cProfile.Profile()
    pr.enable()
    prefill()
    torch.cuda.synchronize()
    pr.disable()
    buf = io.StringIO()
    st = pstats.Stats(pr, stream=buf).sort_stats("cumulative")
    st.print_stats("/dsv4/", args.top)
    packages, funcs = by_package(st, args.top)
    res = {
        "what": "train" if args.train else "decode" if args.decode else "prefill", "length": n, "wall_ms": walls, "issue_ms": issue,
        "kernel_ms": busy, "kernels": n_kernels,
        "aten_ops": sum(mode.ops.values()), "aten_host_only": sum(mode.host_only.values()),
        "triton_launches": sum(c for (w, _), c in trit.items() if not w.startswith("(")),
        "triton_through_jit": sum(c for (w, _), c in trit.items() if w.startswith("(")), "syncs": dict(syncs),
        "aten_by_line": by_line(mode.ops, args.top), "host_only_by_line": by_line(mode.host_only, args.top),
        "aten_by_op": by_op(mode.ops, args.top),
        "triton_by_line": [(f"{w} -> {k}", c) for (w, k), c in trit.most_common(args.top)],
        "python_calls": st.total_calls, "python_by_package": packages, "python_by_function": funcs,
    }
    print(f"== {res['what']} {n}: wall best {min(walls):.2f} ms (median {sorted(walls)[len(walls) // 2]:.2f}; "
          f"the call returned after {min(issue):.2f} ms best), kernels "
          f"{busy:.2f} ms ({n_kernels}), aten ops {res['aten_ops']} (+{res['aten_host_only']} views/allocations), "
          f"Triton launches {res['triton_launches']} ({res['triton_through_jit']} through the JIT), host syncs {sum(syncs.values())}: {dict(syncs)}")
    for title, key in (("aten ops by line", "aten_by_line"), ("aten ops by name", "aten_by_op"),
                       ("Triton launches by caller", "triton_by_line"),
                       ("views/allocations by line", "host_only_by_line")):
        print(f"-- {title}")
        for where, c in res[key][:args.top]:
            print(f"{c:6d}  {where}")
    print("-- kernels by device time (torch.profiler)")
    print(table)
    print("-- cProfile, dsv4 functions by cumulative time (profiler overhead included)")
    print(buf.getvalue())
    print(f"-- cProfile, every function ({res['python_calls']} calls): own time by package, then by function")
    for rows in (packages, funcs):
        for where, calls, own in rows:
            print(f"{calls:7d} {own * 1e3:8.2f} ms  {where}")
        print()
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
