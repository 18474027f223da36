"""Count the operators one decode step (or, with --prefill N, one cached prefill) launches (CPU
profiler; on a GPU each non-view op is a kernel).

    python bench/count_decode_ops.py [--preset bench] [--batch 1]
    TRITON_INTERPRET=1 python bench/count_decode_ops.py --backend triton     # with the Triton kernels

Prints the number of top-level aten ops of `Transformer.decode_step`, the number that are not views
(each a kernel launch on CUDA), and those that come from mHC's Sinkhorn normalisation. With
`--backend triton` the primitives of `dsv4.ops` run their Triton kernels (on a CPU under the
interpreter) and the Triton launches are counted too; the aten ops the interpreter itself runs inside
a launch are left out, so the total is what a CUDA decode step launches.
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv4 import ops  # noqa: E402
from dsv4.cache import DecodeCache  # noqa: E402
from dsv4.config import preset  # noqa: E402
from dsv4.model import Transformer  # noqa: E402

VIEWS = {"aten::slice", "aten::unsqueeze", "aten::select", "aten::view", "aten::flatten", "aten::unflatten",
         "aten::t", "aten::reshape", "aten::expand", "aten::split", "aten::transpose", "aten::permute",
         "aten::squeeze", "aten::as_strided", "aten::alias", "aten::_unsafe_view", "aten::detach",
         "aten::split_with_sizes", "aten::narrow", "aten::to",
         # allocations launch nothing
         "aten::empty", "aten::empty_like", "aten::new_empty", "aten::empty_strided", "aten::resize_"}


@torch.no_grad()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--backend", choices=["torch", "triton"], default="torch")
    ap.add_argument("--prefill", type=int, default=0, metavar="N",
                    help="count a cached prefill of N tokens into empty rows instead of a decode step")
    ap.add_argument("--train", type=int, default=0, metavar="N",
                    help="count one training step (forward, cross-entropy, backward) of N tokens of a bf16 model "
                         "instead (as bench/bench_train.py's eager row)")
    ap.add_argument("--device", default="cpu", help="cpu (Triton under TRITON_INTERPRET=1) or cuda")
    ap.add_argument("--no-pack", action="store_true", help="leave the projection groups unpacked (one GEMM each)")
    ap.add_argument("--where", action="store_true",
                    help="also list the kernels by the dsv4 function that launches them")
    args = ap.parse_args(argv)
    ops.set_backend(args.backend)
    launches = collections.Counter()
    if args.backend == "triton":
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        def counting(cls):
            real_run = cls.run

            def counted_run(self, *a, **k):
                launches[self.fn.__name__] += 1
                with record_function("triton_launch"):
                    return real_run(self, *a, **k)
            cls.run = counted_run
        counting(JITFunction)
        counting(InterpretedFunction)
        from dsv4.kernels import launch as kl
        kl.FAST = False         # every launch through the JIT's run (counted), none from the launch cache
    torch.manual_seed(0)
    cfg = preset(args.preset)
    model = Transformer(cfg).eval()
    dev = torch.device(args.device)
    if args.train:
        model = model.to_dtype(torch.bfloat16).train()
    model = model.to(dev)
    if not args.train and not args.no_pack:
        model.pack_projections()        # as the inference entry points do (`DecodeGraphs`, the engine)
    B = args.batch
    if args.train:
        ids = torch.randint(0, cfg.vocab_size, (B, args.train + 1), device=dev)

        def counted():
            with torch.enable_grad():
                logits = model(ids[:, :-1])
                torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
            for p in model.parameters():
                p.grad = None
        counted()
    elif args.prefill:   # a warm-up prefill of the same length in other rows, then the counted one
        cache = DecodeCache(cfg, 2 * B, args.prefill + 8, device=dev)
        ids = torch.randint(0, cfg.vocab_size, (B, args.prefill), device=dev)
        model(ids, cache=cache, rows=torch.arange(B, 2 * B, device=dev), last_only=True)

        def counted():
            model(ids, cache=cache, rows=torch.arange(B, device=dev), last_only=True)
    else:
        cache = DecodeCache(cfg, B, 512, device=dev)
        ids = torch.randint(0, cfg.vocab_size, (B, 200), device=dev)
        rows = torch.arange(B, device=dev)
        model(ids, cache=cache)
        model.decode_step(ids[:, :1], cache, rows)

        def counted():
            model.decode_step(ids[:, :1], cache, rows)
    real = ops.hc_split_sinkhorn

    def tagged(*a, **k):
        with record_function("sinkhorn"):
            return real(*a, **k)

    ops.hc_split_sinkhorn = tagged
    launches.clear()
    try:
        with profile(activities=[ProfilerActivity.CPU], with_stack=args.where) as prof:
            counted()
    finally:
        ops.hc_split_sinkhorn = real
    def inside(e, name):
        p = e.cpu_parent
        while p is not None:
            if p.name == name:
                return True
            p = p.cpu_parent
        return False

    top = [e for e in prof.events() if e.name.startswith("aten::")
           and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
           and not inside(e, "triton_launch")]
    # `aten::to` is free when the dtype and device already match; otherwise its child `_to_copy` is a kernel
    kernels = [e for e in top if e.name not in VIEWS or (e.name == "aten::to" and any(
        c.name == "aten::_to_copy" for c in e.cpu_children))]

    def in_sinkhorn(e):
        return inside(e, "sinkhorn")

    what = (f"training step of {args.train} tokens" if args.train else
            f"cached prefill of {args.prefill} tokens" if args.prefill else "decode step")
    print(f"{args.preset}, batch {args.batch}: {len(top)} top-level aten ops per {what}, "
          f"{len(kernels)} not views, casts or allocations, {sum(map(in_sinkhorn, kernels))} of those in mHC's Sinkhorn")
    print(collections.Counter(e.name for e in kernels).most_common(12))
    if args.backend == "triton":
        print(f"Triton launches: {sum(launches.values())} ({dict(launches.most_common())}); "
              f"kernels in all: {len(kernels) + sum(launches.values())}")
    if args.where:
        def site(e):
            for frame in e.stack:
                if "/dsv4/" in frame and "/dsv4/kernels/" not in frame:
                    return frame.split("/dsv4/")[-1]
            return "?"
        print("kernels by launching line (aten ops, not counting Triton launches):")
        for where, n in collections.Counter(site(e) for e in kernels).most_common():
            print(f"  {n:4d}  {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
