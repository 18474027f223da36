"""The Triton kernels of `dsv4.kernels` against their PyTorch twins, at the shapes of the `bench`
preset (TARGETS.md: 16 heads × 512) and of V4-Flash (64 heads × 512, indexer 64 × 128).

For each kernel: the median time (triton.testing.do_bench), the FLOPs or bytes it must do (counted
below, from the valid work only) and the fraction of the H200's measured ceilings (790 TFLOP/s bf16,
4.3 TB/s HBM; TARGETS.md). Inputs are random (never zeros); each kernel is first checked against its
twin (relative error printed).

  python bench/bench_kernels.py --out bench_kernels.json          # on a CUDA machine
  python bench/bench_kernels.py --smoke                           # CPU interpreter, tiny shapes

FLOP counts: sparse attention forward 4·H·Dh per (query, valid listed key) (q·k and p·v), backward
8·H·Dh (recomputed q·k, dO·k, dS·k, dSᵀ·q, pᵀ·dO); indexer 2·Hi·Di per (query, visible entry) plus
nothing for the ReLU/weights; pooling and Sinkhorn are memory-bound: bytes = inputs read once +
outputs written once.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PEAK_TFLOPS, HBM = 790.0, 4.3e12


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def timed(fn, smoke):
    if smoke:
        import time
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def attention_inputs(B, S, H, D, T2, window, topk, dev, dtype, g):
    """Prefill-like lists: `window` consecutive keys ending at the query + `topk` random entries of kv2."""
    q = torch.randn(B, S, H, D, generator=g, device=dev).to(dtype)
    kv = torch.randn(B, S, D, generator=g, device=dev).to(dtype)
    kv2 = torch.randn(B, T2, D, generator=g, device=dev).to(dtype)
    s = torch.arange(S, device=dev)
    win = s[:, None] - window + 1 + torch.arange(window, device=dev)
    win = torch.where(win >= 0, win, -1)
    top = torch.rand(S, T2, generator=g, device=dev).topk(min(topk, T2), dim=-1).indices + S
    idx = torch.cat([win, top], dim=-1).to(torch.int32).expand(B, -1, -1).contiguous()
    sink = torch.randn(H, generator=g, device=dev)
    return q, kv, kv2, idx, sink


def bench_attention(name, B, S, H, D, T2, window, topk, dev, dtype, smoke, backward=True):
    from dsv4 import ops
    from dsv4.kernels import sparse_attention as sa
    g = torch.Generator(device=dev).manual_seed(0)
    q, kv, kv2, idx, sink = attention_inputs(B, S, H, D, T2, window, topk, dev, dtype, g)
    scale = D ** -0.5
    valid = int((idx >= 0).sum())
    out, lse = sa.forward(q, kv, idx, sink, scale, kv2)
    n_chk = min(S, 64)
    want = ops.sparse_attention_torch(q[:, :n_chk].double(), kv.double(), idx[:, :n_chk], sink.double(), scale,
                                      kv2.double())
    row = {"kernel": "sparse_attention", "case": name, "B": B, "S": S, "H": H, "Dh": D, "keys_per_query": idx.shape[-1],
           "rel_err_vs_float64": rel(out[:, :n_chk], want)}
    ms = timed(lambda: sa.forward(q, kv, idx, sink, scale, kv2), smoke)
    fl = 4 * H * D * valid
    row.update(fwd_ms=ms, fwd_tflops=fl / ms / 1e9, fwd_frac_peak=fl / ms / 1e9 / PEAK_TFLOPS)
    if not smoke:                     # the launch width against the default's (sa._warps)
        for w in (4, 8):
            msw = timed(lambda: sa.forward(q, kv, idx, sink, scale, kv2, num_warps=w), smoke)
            row[f"fwd_tflops_{w}warps"] = fl / msw / 1e9
    if S * B <= 64:   # decode: the split kernel, bandwidth counted on the key rows read
        ms2 = timed(lambda: sa.forward_split(q, kv, idx, sink, scale, kv2), smoke)
        by = valid * D * q.element_size()
        row.update(split_ms=ms2, split_gbs=by / ms2 / 1e6, split_frac_hbm=by / ms2 / 1e-3 / HBM)
    if backward:
        dout = torch.randn(q.shape, generator=g, device=dev).to(dtype)
        msb = timed(lambda: sa.backward(q, kv, idx, sink, scale, out, lse, dout, kv2), smoke)
        flb = 8 * H * D * valid
        row.update(bwd_ms=msb, bwd_tflops=flb / msb / 1e9, bwd_frac_peak=flb / msb / 1e9 / PEAK_TFLOPS)
    if not smoke and S * B <= 4096:   # the twin, for the ratio
        row["twin_fwd_ms"] = timed(lambda: ops.sparse_attention_torch(q, kv, idx, sink, scale, kv2), smoke)
    return row


def bench_indexer(name, S, C, Hi, Di, topk, dev, dtype, smoke):
    from dsv4 import ops
    from dsv4.kernels import indexer
    g = torch.Generator(device=dev).manual_seed(1)
    q = torch.randn(1, S, Hi, Di, generator=g, device=dev).to(dtype)
    k = torch.randn(1, C, Di, generator=g, device=dev).to(dtype)
    w = torch.randn(1, S, Hi, generator=g, device=dev)
    pos = torch.arange(S, device=dev)
    hi = ((pos + 1) // 4).clamp(max=C).view(1, S) + (C - S // 4 if C > S // 4 else 0)   # causal over the last S/4
    lo = torch.zeros_like(hi)
    vis = int((hi - lo).sum())
    sc = indexer.scores(q, k, w, lo, hi)
    n_chk = min(S, 32)
    want = ops.index_scores(q[:, -n_chk:].double(), k.double(), w[:, -n_chk:].double())
    m = torch.isfinite(sc[:, -n_chk:])
    row = {"kernel": "index_scores", "case": name, "S": S, "C": C, "Hi": Hi, "Di": Di,
           "rel_err_vs_float64": rel(sc[:, -n_chk:][m], want[m])}
    ms = timed(lambda: indexer.scores(q, k, w, lo, hi), smoke)
    fl = 2 * Hi * Di * vis
    row.update(ms=ms, tflops=fl / ms / 1e9, frac_peak=fl / ms / 1e9 / PEAK_TFLOPS)
    row["topk_ms"] = timed(lambda: indexer.topk(q, k, w, lo, hi, topk), smoke)
    return row


def bench_select(R, C, P, dev, smoke, **launch):
    """The radix-select top-k (`indexer.select`) against `torch.topk` on bf16 scores [R, C] (one row per
    decode step, 4K-16K rows in prefill), timed from CUDA graphs (the small cases are launch-sized).
    Both must choose the same scores (ties may pick other indices of equal score)."""
    from dsv4.kernels import indexer
    g = torch.Generator(device=dev).manual_seed(3)
    sc = torch.randn(R, C, generator=g, device=dev).to(torch.float32 if smoke else torch.bfloat16)

    def ref():
        top = sc.topk(min(P, C), dim=-1)
        return torch.where(top.values == float("-inf"), -1, top.indices).to(torch.int32)

    got, want = indexer.select(sc, P, **launch), ref()
    chosen = lambda idx: sc.float().gather(-1, idx.long()).sort(-1).values
    row = {"kernel": "topk_select", "case": f"R {R} C {C} P {P} {launch or ''}", "R": R, "C": C, "P": P,
           "launch": launch, "same_scores": bool(torch.equal(chosen(got), chosen(want))), "rel_err_vs_twin": 0.0}
    if smoke:
        row.update(ms=timed(lambda: indexer.select(sc, P, **launch), smoke), torch_ms=timed(ref, smoke))
    else:
        import triton
        row["ms"] = triton.testing.do_bench_cudagraph(lambda: indexer.select(sc, P, **launch), rep=50)
        row["torch_ms"] = triton.testing.do_bench_cudagraph(ref, rep=50)
    row["gbs"] = R * C * sc.element_size() / row["ms"] / 1e6
    row["frac_hbm"] = row["gbs"] * 1e9 / HBM
    row["tflops"] = 0.0
    return row


def bench_pool(S, c, m, dev, smoke):
    from dsv4 import ops
    from dsv4.kernels import compressor
    g = torch.Generator(device=dev).manual_seed(2)
    ov = m == 4
    w = 2 * c if ov else c
    kv = torch.randn(1, S, w, generator=g, device=dev)
    sc = torch.randn(1, S, w, generator=g, device=dev)
    n = S // m
    i = torch.arange(n, device=dev)[:, None] * m + torch.arange(m, device=dev)
    slots = torch.cat([torch.where(i >= m, i - m, -1), i], -1) if ov else i
    slots = slots.unsqueeze(0).to(torch.int32)
    got = compressor.pool(kv, sc, slots, ov)
    row = {"kernel": "compress_pool", "case": f"M={m}", "S": S, "c": c,
           "rel_err_vs_twin": rel(got, ops.compress_windows_torch(kv, sc, slots.long(), ov))}
    ms = timed(lambda: compressor.pool(kv, sc, slots, ov), smoke)
    by = (2 * S * w + n * c) * 4
    row.update(ms=ms, gbs=by / ms / 1e6, frac_hbm=by / ms / 1e-3 / HBM,
               twin_ms=timed(lambda: ops.compress_windows_torch(kv, sc, slots.long(), ov), smoke))
    return row


def bench_sinkhorn(N, dev, smoke):
    from dsv4 import ops
    from dsv4.kernels import mhc
    g = torch.Generator(device=dev).manual_seed(3)
    mixes = torch.randn(N, 24, generator=g, device=dev)
    scale = torch.rand(3, generator=g, device=dev) + 0.5
    base = torch.randn(24, generator=g, device=dev)
    got = mhc.split_sinkhorn(mixes, scale, base, 4, 20, 1e-6)
    want = ops.hc_split_sinkhorn_torch(mixes.double(), scale.double(), base.double(), 4, 20, 1e-6)
    row = {"kernel": "hc_split_sinkhorn", "case": f"N={N}", "rel_err_vs_float64": max(rel(a, b) for a, b in zip(got, want))}
    ms = timed(lambda: mhc.split_sinkhorn(mixes, scale, base, 4, 20, 1e-6), smoke)
    row.update(ms=ms, twin_ms=timed(lambda: ops.hc_split_sinkhorn_torch(mixes, scale, base, 4, 20, 1e-6), smoke))
    return row


def hc_pre_inputs(T, D, n, dev, dtype, seed):
    """(generator, h [1, T, n, D] in dtype, fn, scale, base fp32) for the mHC pre-mixing benchmarks."""
    g = torch.Generator(device=dev).manual_seed(seed)
    h = torch.randn(1, T, n, D, generator=g, device=dev).to(dtype)
    fn = torch.randn((2 + n) * n, n * D, generator=g, device=dev) / (n * D) ** 0.5
    scale = torch.rand(3, generator=g, device=dev) + 0.5
    base = torch.randn((2 + n) * n, generator=g, device=dev)
    return g, h, fn, scale, base


def bench_hc_pre(T, D, dev, dtype, smoke, **blocks):
    """mHC's fused pre-mixing (mix GEMV + Sinkhorn + collapse) for T tokens of 4 streams of D; bytes =
    the streams read twice (mix, collapse) + x written."""
    from dsv4 import ops
    from dsv4.kernels import mhc
    n = 4
    g, h, fn, scale, base = hc_pre_inputs(T, D, n, dev, dtype, seed=4)
    got = mhc.hc_pre(h, fn, scale, base, n, 20, 1e-6, 1e-6, **blocks)
    want = ops.hc_pre_torch(h.double(), fn.double(), scale.double(), base.double(), n, 20, 1e-6, 1e-6)
    call = lambda: mhc.hc_pre(h, fn, scale, base, n, 20, 1e-6, 1e-6, **blocks)          # noqa: E731
    if T < 16 and not smoke:   # decode-sized: from a CUDA graph (eager timing is the launch's)
        import triton
        ms = triton.testing.do_bench_cudagraph(call, rep=50)
    else:
        ms = timed(call, smoke)
    nbytes = 2 * h.numel() * h.element_size() + T * D * h.element_size()
    return {"kernel": "hc_pre", "case": f"T={T} D={D} {blocks or 'default'}",
            "rel_err_vs_float64": max(rel(a, b) for a, b in zip(got, want)), "ms": ms,
            "GB_s": nbytes / ms / 1e6, "hbm_fraction": nbytes / ms / 1e-3 / HBM,
            "twin_ms": timed(lambda: ops.hc_pre_torch(h, fn, scale, base, n, 20, 1e-6, 1e-6), smoke)}


def bench_hc_pre_bwd(T, D, dev, dtype, smoke, **blocks):
    """mHC pre-mixing's backward (`hc_pre_backward`: dpre, Sinkhorn backward, dh and dfn) for T tokens of
    4 streams of D; error of dfn and dh against float64 autograd of the twin; bytes = h read twice, dx
    read twice, dh written."""
    from dsv4 import ops
    from dsv4.kernels import mhc
    n = 4
    g, h, fn, scale, base = hc_pre_inputs(T, D, n, dev, dtype, seed=5)
    dx = torch.randn(1, T, D, generator=g, device=dev).to(dtype)
    dpost = torch.randn(1, T, n, generator=g, device=dev)
    dcomb = torch.randn(1, T, n, n, generator=g, device=dev)
    *_, saved = mhc.hc_pre(h, fn, scale, base, n, 20, 1e-6, 1e-6, save=True)
    call = lambda: mhc.hc_pre_backward(h, fn, scale, base, saved, n, 20, 1e-6, dx, dpost, dcomb, **blocks)  # noqa: E731
    got = call()
    leaves = [t.double().requires_grad_() for t in (h, fn, scale, base)]
    outs = ops.hc_pre_torch(*leaves, n, 20, 1e-6, 1e-6)
    want = torch.autograd.grad(outs, leaves, [dx.double(), dpost.double(), dcomb.double()])
    ms = timed(call, smoke)
    nbytes = 3 * h.numel() * h.element_size() + 2 * dx.numel() * dx.element_size()
    return {"kernel": "hc_pre_bwd", "case": f"T={T} D={D} {blocks or 'default'}",
            "rel_err_vs_float64": max(rel(got[0], want[0]), rel(got[1], want[1])), "dfn_err": rel(got[1], want[1]),
            "ms": ms, "GB_s": nbytes / ms / 1e6, "hbm_fraction": nbytes / ms / 1e-3 / HBM}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter at tiny shapes")
    ap.add_argument("--only", default=None,
                    help="comma-separated: attention,decode,indexer,select,pool,sinkhorn,hc,hc1b (mHC forward and "
                         "backward at bench-1b's 2,048)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    dev = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    only = set(args.only.split(",")) if args.only else {"attention", "decode", "indexer", "select", "pool", "sinkhorn",
                                                        "hc"}
    rows = []
    sm = args.smoke
    if "attention" in only:
        cases = [("tiny", 1, 16, 2, 64, 32, 8, 8)] if sm else [
            ("bench CSA 4K", 1, 4096, 16, 512, 1024, 128, 512), ("bench CSA 16K", 1, 16384, 16, 512, 4096, 128, 512),
            ("flash CSA 4K", 1, 4096, 64, 512, 1024, 128, 512), ("flash CSA 16K", 1, 16384, 64, 512, 4096, 128, 512)]
        for c in cases:
            rows.append(bench_attention(*c, dev, dtype, sm))
            print(rows[-1], flush=True)
    if "decode" in only:
        cases = [("tiny decode", 2, 1, 2, 64, 64, 8, 32)] if sm else [
            ("bench decode B1 CSA", 1, 1, 16, 512, 4096, 129, 512), ("bench decode B1 HCA 1M", 1, 1, 16, 512, 8192, 129, 8192),
            ("bench decode B32 CSA", 32, 1, 16, 512, 4096, 129, 512), ("flash decode B1 CSA", 1, 1, 64, 512, 4096, 129, 512)]
        for c in cases:
            rows.append(bench_attention(*c, dev, dtype, sm, backward=False))
            print(rows[-1], flush=True)
    if "indexer" in only:
        cases = [("tiny", 32, 16, 2, 32, 8)] if sm else [
            ("bench 16K", 16384, 4096, 16, 128, 512), ("flash 16K", 16384, 4096, 64, 128, 512),
            ("bench 64K chunk of 8K queries", 8192, 16384, 16, 128, 512)]
        for c in cases:
            rows.append(bench_indexer(*c, dev, dtype, sm))
            print(rows[-1], flush=True)
    if "select" in only:
        cases = [(3, 300, 16, {})] if sm else [
            (1, 1024, 512, {}), (1, 1024, 512, {"block": 256, "num_warps": 4}), (1, 4096, 512, {}),
            (1, 16384, 512, {}), (1, 65536, 512, {}), (1, 262144, 512, {}), (1, 262144, 1024, {}),
            (32, 4096, 512, {}), (32, 65536, 512, {}), (4096, 1024, 512, {}), (4096, 4096, 512, {}),
            (4096, 4096, 512, {"block": 1024, "num_warps": 4}), (16384, 4096, 512, {}), (8192, 16384, 512, {})]
        for R, C, P, launch in cases:
            rows.append(bench_select(R, C, P, dev, sm, **launch))
            print(rows[-1], flush=True)
    if "pool" in only:
        for S, c, m in ([(32, 16, 4)] if sm else [(16384, 512, 4), (16384, 512, 128), (16384, 128, 4)]):
            rows.append(bench_pool(S, c, m, dev, sm))
            print(rows[-1], flush=True)
    if "sinkhorn" in only:
        for N in ([40] if sm else [1, 32, 16384]):
            rows.append(bench_sinkhorn(N, dev, sm))
            print(rows[-1], flush=True)
    if "hc1b" in only:
        fwd = [(32, 32, {})] if sm else [(4096, 2048, {}), (4096, 2048, {"mix_precision": "ieee"}),
                                          (4096, 2048, {"mix_precision": "tf32x3"}), (4096, 2048, {"block_t": 64}),
                                          (4096, 2048, {"block_t": 64, "block_k": 128}), (4096, 2048, {"block_t": 128}),
                                          (4096, 2048, {"block_t": 16}), (4096, 2048, {"block_t": 32, "block_k": 128})]
        for T, D, blocks in fwd:
            rows.append(bench_hc_pre(T, D, dev, dtype, sm, **blocks))
            print(rows[-1], flush=True)
        bwd = [(32, 32, {})] if sm else [(4096, 2048, {}), (4096, 2048, {"prec": "tf32x3"}),
                                          (4096, 2048, {"block_d": 128}), (4096, 2048, {"block_t": 128}),
                                          (4096, 2048, {"block_t": 32, "block_d": 128}),
                                          (4096, 2048, {"block_t": 128, "block_d": 128})]
        for T, D, blocks in bwd:
            rows.append(bench_hc_pre_bwd(T, D, dev, dtype, sm, **blocks))
            print(rows[-1], flush=True)
    if "hc" in only:
        cases = [(8, 32, {})] if sm else [
            (1, 1024, {}), (1, 1024, {"finish_warps": 1}), (1, 1024, {"finish_warps": 2}),
            (1, 4096, {"finish_warps": 1}), (1, 4096, {"finish_warps": 2}),
            (1, 1024, {"block_k": 128}), (1, 1024, {"programs": 32}), (1, 4096, {}),
            (1, 4096, {"block_k": 128}), (32, 1024, {}), (4096, 1024, {}), (4096, 1024, {"block_t": 64}),
            (4096, 1024, {"block_t": 16}), (4096, 1024, {"mix_precision": "tf32x3"}), (16384, 1024, {}),
            (4096, 4096, {}), (4096, 4096, {"mix_precision": "tf32x3"})]
        for T, D, blocks in cases:
            rows.append(bench_hc_pre(T, D, dev, dtype, sm, **blocks))
            print(rows[-1], flush=True)
    env = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not sm else "cpu"}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    print("\nkernel             case                      ms      TFLOP/s  frac     err")
    for r in rows:
        ms = r.get("fwd_ms", r.get("ms"))
        tf = r.get("fwd_tflops", r.get("tflops", 0.0))
        print(f"{r['kernel']:<18} {r['case']:<24} {ms:8.3f} {tf:8.1f}  {r.get('fwd_frac_peak', r.get('frac_peak', r.get('frac_hbm', 0))):.3f}"
              f"  {r.get('rel_err_vs_float64', r.get('rel_err_vs_twin')):.1e}"
              + (f"  bwd {r['bwd_ms']:.3f} ms {r['bwd_tflops']:.1f} TF/s" if "bwd_ms" in r else "")
              + (f"  split {r['split_ms']:.3f} ms {r['split_gbs']:.0f} GB/s" if "split_ms" in r else "")
              + (f"  twin {r.get('twin_fwd_ms', r.get('twin_ms')):.3f} ms" if ("twin_ms" in r or "twin_fwd_ms" in r) else "")
              + (f"  torch.topk {r['torch_ms']:.3f} ms, same scores {r['same_scores']}" if "torch_ms" in r else ""))
    if args.out:
        Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
