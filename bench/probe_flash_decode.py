"""Every variant of the decode step's quantised kernels at V4-Flash shapes, batch 1 and 2, from HBM.

One command times, on one GPU, the FP4 routed-expert GEMVs (`dsv4.kernels.fp4_moe`: the byte kernel
`_fp4_up_gemv_kernel` and the int32-word kernel `_fp4_up_words_kernel`, several launch tiles each, and
the word kernel's down projection per pair or per token), the attention's grouped `wo_a` (bf16 einsum on
a dequantised copy, as a dequantise-on-load model runs it, against the grouped FP8 GEMV
`fp8_grouped_gemv` that a quantised-resident model runs), the FP8 GEMV of the other projections
(default tiles and two variants), the indexer of one decode query (scores: query blocks against the
few-query kernel; top-k: radix select against `torch.topk`) and hc_pre of one token (the finish's warps
and column split). Each timing is the median of CUDA-graph replays of a
sweep over more weight bytes than the 60 MB L2 holds (the experts of 16 different top-6 sets; 4 copies
of each FP8 matrix), divided by the sweep length, so the weights come from HBM as in a decode step. Each
variant's error is measured against float64 on fresh random inputs (relative Frobenius norm). Prints a
table last and writes JSON.

    python3 bench/probe_flash_decode.py --out $OUT/flash_decode.json
    python3 bench/probe_flash_decode.py --only hc,index --out $OUT/hc_index.json      # sections
    python3 bench/probe_flash_decode.py --only fp4loop --out $OUT/fp4_loop.json     # the FP4 K loop variants
    TRITON_INTERPRET=1 python3 bench/probe_flash_decode.py --small      # CPU: reduced sizes, no timing
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsv4 import ops, quant  # noqa: E402
from dsv4.kernels import fp4_moe  # noqa: E402
from dsv4.kernels import fp8_gemm  # noqa: E402

HBM = 4.3e12
FLASH = dict(E=256, D=4096, I=2048, topk=6, limit=10.0, H=64, Dh=512, G=8, R=1024, Iq=1024, index_heads=64,
             index_dim=128)
SMALL = dict(E=8, D=256, I=128, topk=2, limit=10.0, H=4, Dh=64, G=2, R=64, Iq=64, index_heads=2, index_dim=64)
BYTES_TILES = [dict(BN=4, BK=512, num_warps=4, num_stages=2), dict(BN=8, BK=256, num_warps=4, num_stages=2)]
WORDS_DOWN_TILES = [dict(BN=bn, BK=bk, num_warps=w, num_stages=2) for bn, bk, w in
                    [(16, 512, 4), (8, 512, 4), (8, 1024, 4), (4, 1024, 4), (4, 512, 2)]]
# the per-pair down projection's own tiles (fp4_moe.TILES["words_pair_down"]; default: the up kernel's)
PAIR_DOWN_TILES = [dict(BN=bn, BK=bk, num_warps=w, num_stages=2) for bn, bk, w in
                   [(16, 1024, 4), (16, 2048, 4), (32, 1024, 4), (32, 2048, 8), (8, 2048, 4), (64, 512, 8)]]
# (up, per-pair down) tiles of the "loop" variants: the default, then 32-row tiles of 256 columns (a pipelined
# up program takes 127 registers there: 4 an SM, 384 programs for 6 experts; the down program 72)
LOOP_TILES = [(dict(BN=16, BK=512, num_warps=4, num_stages=2), dict(BN=16, BK=512, num_warps=4, num_stages=2)),
              (dict(BN=32, BK=256, num_warps=4, num_stages=2), dict(BN=32, BK=256, num_warps=4, num_stages=2)),
              (dict(BN=16, BK=512, num_warps=4, num_stages=2), dict(BN=32, BK=256, num_warps=4, num_stages=2)),
              (dict(BN=32, BK=256, num_warps=4, num_stages=2), dict(BN=64, BK=256, num_warps=4, num_stages=2))]
WORDS_TILES = [dict(BN=bn, BK=bk, num_warps=w, num_stages=2) for bn, bk, w in
               [(16, 512, 4), (16, 1024, 4), (8, 1024, 4), (8, 512, 4), (4, 1024, 4), (32, 1024, 8), (32, 256, 4),
                (32, 512, 4), (64, 256, 4), (32, 512, 8)]]


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return float((a - ref).norm() / ref.norm())


def sweep_us(fns, device) -> float:
    """Median µs of one call of a sweep over `fns` (each reads its own weights): CUDA-graph replay on a
    GPU; on the CPU (interpreter) one eager pass, for the record only."""
    run = lambda: [f() for f in fns]                                                  # noqa: E731
    if device.type != "cuda":
        t = time.perf_counter()
        run()
        return 1e6 * (time.perf_counter() - t) / len(fns)
    return 1e3 * triton.testing.do_bench_cudagraph(run, rep=50, return_mode="median") / len(fns)


def random_experts(E, D, I, device, g):
    """Packed FP4 experts (w1, s1, w2, s2, w3, s3), quantised 16 experts at a time on the device."""
    out = []
    for rows, cols in ((I, D), (D, I), (I, D)):
        parts = [quant.quant_fp4(torch.randn(min(16, E - e) * rows, cols, device=device, generator=g) * 3 / cols ** 0.5)
                 for e in range(0, E, 16)]
        out += [torch.cat([p for p, _ in parts]).view(E, rows, cols // 2),
                torch.cat([s for _, s in parts]).view(E, rows, -1)]
    return out


def f64_experts(x, idx, weight, ws, limit):
    """Spec §8.4 in float64 on the used experts."""
    w1, s1, w2, s2, w3, s3 = ws
    deq = lambda w, s, e: quant.dequant_fp4(w[e], s[e], dtype=torch.float64)         # noqa: E731
    y = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for t in range(idx.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            xt = x[t].double()
            gate = (deq(w1, s1, e) @ xt).clamp(max=limit)
            up = (deq(w3, s3, e) @ xt).clamp(-limit, limit)
            y[t] += deq(w2, s2, e) @ (torch.nn.functional.silu(gate) * up * float(weight[t, k]))
    return y


def fp4_variants(which: str) -> list[tuple]:
    """(kernel, tiles, down projection of the words kernel, its own tiles, arithmetic[, pipelined loop,
    row-max block]) of the FP4 section: "tiles" sweeps the launch tiles of both kernels and both
    arithmetics; "loop" the words kernels' K loop plain or pipelined (`fp4_moe.WORDS_PIPE`) with the row
    max read in BK blocks or in one (`WORDS_AMAX_BLOCK`), on the released words or on words repacked into
    the decode layout (`fp4_moe.repack_words`: 8 integer operations a word against 15), over tiles
    whose pipelined form keeps the grid within about one wave of resident programs
    (`bench/sass_fp4_gemv.py --words`)."""
    if which == "loop":
        out = []
        for up, down in LOOP_TILES:
            for pipe, amax, rep in ((False, None, False), (False, 4096, False), (True, 4096, False),
                                    (False, 4096, True), (True, 4096, True)):
                out.append(("words", up, "pair", down, "half", pipe, amax, rep))
        return out
    return [("bytes", t, None, None, "fp32") for t in BYTES_TILES] + \
        [("words", t, "pair", None, "fp32") for t in WORDS_TILES[:3]] + \
        [("words", t, "pair", None, "half") for t in WORDS_TILES] + \
        [("words", WORDS_TILES[1], "pair", d, math) for d in PAIR_DOWN_TILES for math in ("fp32", "half")]


def probe_fp4(c, M, device, g, ws, variant_set: str = "tiles") -> list[dict]:
    E, D, I, K = c["E"], c["D"], c["I"], c["topk"]
    sets = 16 if device.type == "cuda" else 2                    # 16 x 6 experts: ~1.2 GB per sweep at Flash size
    perm = torch.randperm(E, device=device, generator=g)
    idxs = [perm[(s * M * K + torch.arange(M * K, device=device)) % E].view(M, K) for s in range(sets)]
    x = torch.randn(M, D, device=device, generator=g).to(torch.bfloat16)
    weight = torch.rand(M, K, device=device, generator=g)
    ref = f64_experts(x, idxs[0], weight, ws, c["limit"])
    used_bytes = M * K * (3 * I * D // 2 + 3 * I * D // 32)
    rows = []
    # (kernel, tiles, down projection of the words kernel, its tiles when summing a token's pairs, the words
    # kernels' arithmetic: fp32 or packed fp16)
    variants = fp4_variants(variant_set)
    saved = {k: dict(v) for k, v in fp4_moe.TILES.items()}
    saved_down, saved_kernel, saved_math = fp4_moe.WORDS_DOWN, fp4_moe.DECODE_KERNEL, fp4_moe.WORDS_MATH
    saved_pipe, saved_amax = fp4_moe.WORDS_PIPE, fp4_moe.WORDS_AMAX_BLOCK
    repacked = None
    for kernel, tiles, down, down_tiles, math, *loop in variants:
        rep = bool(loop) and loop.pop()
        if rep and repacked is None:          # the experts in the word kernels' decode layout, once
            repacked = [fp4_moe.repack_words(t) if k % 2 == 0 else t for k, t in enumerate(ws)]
        key = "gemv" if kernel == "bytes" else "words"
        fp4_moe.TILES[key] = tiles
        fp4_moe.WORDS_DOWN = down or saved_down
        fp4_moe.DECODE_KERNEL = kernel            # the "gemv" path runs DECODE_KERNEL's kernel
        fp4_moe.WORDS_MATH = math
        pipe, amax = loop or (saved_pipe, saved_amax)
        fp4_moe.WORDS_PIPE, fp4_moe.WORDS_AMAX_BLOCK = pipe, amax
        if down_tiles:
            fp4_moe.TILES["words_down" if down == "token" else "words_pair_down"] = down_tiles
        name = kernel if down is None else f"{kernel} {math}, down per {down}"
        if loop:
            name += f", {'pipelined' if pipe else 'plain'} loop, max in {amax or 'BK'}{', repacked' if rep else ''}"
        shown = tiles if not down_tiles else {**tiles, "down": down_tiles}
        try:
            call = lambda i: fp4_moe._fp4_moe(x, i, weight, *(repacked if rep else ws), c["limit"],  # noqa: E731
                                              path=key, repacked=rep)
            err = rel(call(idxs[0]), ref)
            us = sweep_us([lambda i=i: call(i) for i in idxs], device)
        except Exception as exc:      # a tile that does not compile or fit: recorded, skipped
            rows.append(dict(op="fp4 experts", M=M, variant=name, tiles=shown, error=f"{type(exc).__name__}: {exc}"[:300]))
            continue
        finally:
            fp4_moe.TILES.clear()
            fp4_moe.TILES.update({k: dict(v) for k, v in saved.items()})
            fp4_moe.WORDS_DOWN, fp4_moe.DECODE_KERNEL, fp4_moe.WORDS_MATH = saved_down, saved_kernel, saved_math
            fp4_moe.WORDS_PIPE, fp4_moe.WORDS_AMAX_BLOCK = saved_pipe, saved_amax
        kernel, tiles = name, shown
        rows.append(dict(op="fp4 experts", M=M, variant=kernel, tiles=tiles, us=us, bytes=used_bytes,
                         GBps=used_bytes / us / 1e3, hbm_frac=used_bytes / us / 1e-6 / HBM, rel_err_f64=err))
        print(f"fp4 M={M} {kernel} {tiles}: {us:7.1f} us {rows[-1]['GBps']:7.0f} GB/s err {err:.2e}", flush=True)
    return rows


def f64_linear(x, w, s):
    return x.double() @ quant.dequant_fp8(w, s, dtype=torch.float64).t()


def probe_wo_a(c, M, device, g) -> list[dict]:
    """The grouped wo_a: [M, G, H·Dh/G] -> [M, G·R]."""
    G, R, Kg = c["G"], c["R"], c["H"] * c["Dh"] // c["G"]
    copies = 4 if device.type == "cuda" else 1
    mats = [quant.quant_fp8(torch.randn(G * R, Kg, device=device, generator=g) / Kg ** 0.5) for _ in range(copies)]
    bf = [quant.dequant_fp8(w, s, dtype=torch.bfloat16) for w, s in mats[:2 if device.type == "cuda" else 1]]
    x = torch.randn(M, G, Kg, device=device, generator=g).to(torch.bfloat16)
    wd = quant.dequant_fp8(*mats[0], dtype=torch.float64).view(G, R, Kg)
    ref = torch.einsum("mgk,grk->mgr", x.double(), wd).flatten(1)
    einsum = lambda w: torch.einsum("mgi,gri->mgr", x, w.view(G, R, Kg)).flatten(1)   # noqa: E731 (attention's)
    runs = [("bf16 einsum (now)", None, [lambda w=w: einsum(w) for w in bf], 2 * G * R * Kg),
            ("fp8 twin (dequant+einsum)", None, [lambda m=m: ops.fp8_grouped_linear_torch(x, *m) for m in mats],
             G * R * Kg)]
    for tiles in [{}, dict(BN=4, BK=1024), dict(BN=16, BK=256), dict(BN=2, BK=2048)]:
        runs.append(("fp8 grouped gemv", tiles, [lambda m=m, t=tiles: fp8_gemm.fp8_grouped_gemv(x, *m, **t)
                                                 for m in mats], G * R * Kg))
    rows = []
    for name, tiles, fns, nbytes in runs:
        try:
            err = rel(fns[0](), ref)
            us = sweep_us(fns, device)
        except Exception as exc:
            rows.append(dict(op="wo_a", M=M, variant=name, tiles=tiles, error=f"{type(exc).__name__}: {exc}"[:300]))
            continue
        rows.append(dict(op="wo_a", M=M, variant=name, tiles=tiles, us=us, bytes=nbytes, GBps=nbytes / us / 1e3,
                         hbm_frac=nbytes / us / 1e-6 / HBM, rel_err_f64=err))
        print(f"wo_a M={M} {name} {tiles or ''}: {us:7.1f} us {rows[-1]['GBps']:7.0f} GB/s err {err:.2e}", flush=True)
    return rows


def probe_fp8(c, M, device, g) -> list[dict]:
    D, Iq, H, Dh, I = c["D"], c["Iq"], c["H"], c["Dh"], c["I"]
    shapes = {"wq_a": (Iq, D), "wq_b": (H * Dh, Iq), "wkv": (Dh, D), "wo_b": (D, c["G"] * c["R"]),
              "indexer.wq_b": (c["index_heads"] * c["index_dim"], Iq), "shared.w1": (I, D), "shared.w2": (D, I)}
    rows = []
    for name, (N, K) in shapes.items():
        copies = max(1, min(16, -(-128 * 2 ** 20 // (N * K)))) if device.type == "cuda" else 1   # >= 128 MB a sweep
        mats = [quant.quant_fp8(torch.randn(N, K, device=device, generator=g) / K ** 0.5) for _ in range(copies)]
        x = torch.randn(M, K, device=device, generator=g).to(torch.bfloat16)
        ref = f64_linear(x, *mats[0])
        nbytes = N * K + mats[0][1].numel()
        for tiles in [{}, dict(BN=8, BK=512), dict(BN=2, BK=2048)]:
            try:
                fns = [lambda m=m, t=tiles: fp8_gemm.fp8_gemv(x, *m, **t) for m in mats]
                err = rel(fns[0](), ref)
                us = sweep_us(fns, device)
            except Exception as exc:
                rows.append(dict(op=f"fp8 {name}", M=M, variant="gemv", tiles=tiles, error=f"{type(exc).__name__}: {exc}"[:300]))
                continue
            rows.append(dict(op=f"fp8 {name}", shape=[N, K], M=M, variant="gemv", tiles=tiles, us=us, bytes=nbytes,
                             GBps=nbytes / us / 1e3, hbm_frac=nbytes / us / 1e-6 / HBM, rel_err_f64=err))
            print(f"fp8 {name} {N}x{K} M={M} {tiles or 'default'}: {us:7.1f} us {rows[-1]['GBps']:7.0f} GB/s "
                  f"err {err:.2e}", flush=True)
    return rows


@torch.no_grad()
def probe_index(c, device, g, contexts) -> list[dict]:
    """The lightning indexer of one decode token (spec §6.2): scores over C compressed entries (the block
    kernel against the few-query kernel, entry blocks of 16/32/64) and the top-k (radix select against
    `torch.topk`), errors against float64 scores."""
    from dsv4.kernels import indexer
    Hi, Di, P = c["index_heads"], c["index_dim"], 512 if device.type == "cuda" else 16
    rows = []
    for ctx in contexts:
        C = ctx // 4
        q = torch.randn(1, 1, Hi, Di, device=device, generator=g).to(torch.bfloat16)
        k = torch.randn(1, C, Di, device=device, generator=g).to(torch.bfloat16)
        w = torch.randn(1, 1, Hi, device=device, generator=g)
        lo = torch.zeros(1, 1, dtype=torch.int32, device=device)
        hi = torch.full((1, 1), C, dtype=torch.int32, device=device)
        ref = ops.index_scores(q.double(), k.double(), w.double(), torch.zeros(1, dtype=torch.long, device=device))
        runs = [("scores, query blocks", {}, lambda: indexer.scores(q, k, w, lo, hi, few=False))]
        saved = indexer.FEW_BLOCK_C
        for bc in (16, 32, 64):
            for nw in (4, 8):
                def few(bc=bc, nw=nw):
                    indexer.FEW_BLOCK_C = bc
                    try:
                        return indexer.scores(q, k, w, lo, hi, few=True, num_warps=nw)
                    finally:
                        indexer.FEW_BLOCK_C = saved
                runs.append(("scores, few queries", dict(BLOCK_C=bc, num_warps=nw), few))
        sc = indexer.scores(q, k, w, lo, hi)
        for nw in (4, 8):
            runs.append(("select", dict(num_warps=nw), lambda nw=nw: indexer.select(sc, P, num_warps=nw)))
        runs.append(("torch.topk", {}, lambda: sc.topk(min(P, C), dim=-1)))
        # as in a decode step: a cache a little longer than the context (capacity past a power of two),
        # the row's visible entries [0, C) given as a range
        cap = C + 20
        kc = torch.randn(1, cap, Di, device=device, generator=g).to(torch.bfloat16)
        scc = indexer.scores(q, kc, w, lo, hi)
        for blk, nw in ((None, None), (2048, 8), (2048, 4), (1024, 4), (4096, 4)):
            if blk is not None and blk > 4 * C:
                continue
            runs.append(("select, ranged, capacity C+20", dict(block=blk, num_warps=nw),
                         lambda blk=blk, nw=nw: indexer.select(scc, P, lo, hi, block=blk, num_warps=nw)))
        for name, tiles, fn in runs:
            try:
                out = fn()
                err = rel(out.float(), ref) if name.startswith("scores") else 0.0
                us = sweep_us([fn], device)
            except Exception as exc:
                rows.append(dict(op=f"index ctx {ctx}", M=1, variant=name, tiles=tiles,
                                 error=f"{type(exc).__name__}: {exc}"[:300]))
                continue
            rows.append(dict(op=f"index ctx {ctx}", M=1, variant=name, tiles=tiles, us=us, bytes=C * Di * 2,
                             GBps=C * Di * 2 / us / 1e3, hbm_frac=C * Di * 2 / us / 1e-6 / HBM, rel_err_f64=err))
            print(f"index ctx {ctx} {name} {tiles}: {us:7.1f} us err {err:.2e}", flush=True)
    return rows


def probe_hc(c, device, g) -> list[dict]:
    """hc_pre of one decode token at V4-Flash's width (4 streams × 4,096): the mix GEMV and the finish
    (Sinkhorn, gates, weighted sum), with the finish's warps and its column split varied."""
    from dsv4.kernels import mhc
    n, D = 4, c["D"]
    h = torch.randn(1, 1, n, D, device=device, generator=g).to(torch.bfloat16)
    fn = torch.randn((2 + n) * n, n * D, device=device, generator=g) / (n * D) ** 0.5
    scale = torch.rand(3, device=device, generator=g) + 0.5
    base = torch.randn((2 + n) * n, device=device, generator=g)
    ref = ops.hc_pre_torch(h.double(), fn.double(), scale.double(), base.double(), n, 20, 1e-6, 1e-6)
    rows = []
    for warps in (4, 2, 1):
        for programs in (None, 1):
            tiles = dict(finish_warps=warps, finish_programs=programs)
            fn_ = lambda t=tiles: mhc.hc_pre(h, fn, scale, base, n, 20, 1e-6, 1e-6, **t)   # noqa: E731
            try:
                out = fn_()
                err = max(rel(a.double(), b) for a, b in zip(out, ref))
                us = sweep_us([fn_], device)
            except Exception as exc:
                rows.append(dict(op="hc_pre T=1", M=1, variant="finish", tiles=tiles,
                                 error=f"{type(exc).__name__}: {exc}"[:300]))
                continue
            nbytes = n * D * 2 + fn.numel() * 4
            rows.append(dict(op="hc_pre T=1", M=1, variant="mix + finish", tiles=tiles, us=us, bytes=nbytes,
                             GBps=nbytes / us / 1e3, hbm_frac=nbytes / us / 1e-6 / HBM, rel_err_f64=err))
            print(f"hc_pre T=1 {tiles}: {us:7.1f} us err {err:.2e}", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="reduced sizes (CPU under TRITON_INTERPRET=1)")
    ap.add_argument("--batches", default="1,2")
    ap.add_argument("--skip-fp8", action="store_true", help="only the experts and wo_a")
    ap.add_argument("--only", default="fp4,wo_a,fp8,index,hc", help="sections, comma-separated (also fp4loop: the "
                                                                   "FP4 words kernels' K loop, plain or pipelined)")
    ap.add_argument("--contexts", default="8192,65536", help="index section: context lengths (entries = ctx / 4)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    c = SMALL if args.small else FLASH
    g = torch.Generator(device=device).manual_seed(0)
    t0 = time.time()
    only = set(args.only.split(","))
    rows = []
    batches = [int(b) for b in args.batches.split(",")]
    if "hc" in only:
        rows += probe_hc(c, device, g)
    if "index" in only:
        contexts = [int(x) for x in args.contexts.split(",")] if device.type == "cuda" else [256]
        rows += probe_index(c, device, g, contexts)
    if "fp4" in only or "fp4loop" in only:
        ws = random_experts(c["E"], c["D"], c["I"], device, g)
        for M in batches:
            for which in ("tiles", "loop"):
                if {"tiles": "fp4", "loop": "fp4loop"}[which] in only:
                    rows += probe_fp4(c, M, device, g, ws, which)
        del ws
    if "wo_a" in only:
        for M in batches:
            rows += probe_wo_a(c, M, device, g)
    if "fp8" in only and not args.skip_fp8:
        for M in batches[:1]:
            rows += probe_fp8(c, M, device, g)
    res = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)",
               torch=torch.__version__, triton=triton.__version__, shapes=c, hbm_Bps=HBM, wall_s=time.time() - t0,
               decode_kernel_default=fp4_moe.DECODE_KERNEL, rows=rows)
    print(f"\n{'op':16s} {'M':>2s} {'variant':26s} {'tiles':34s} {'us':>8s} {'GB/s':>7s} {'HBM':>5s} {'err f64':>8s}")
    for r in rows:
        tiles = json.dumps({k: v for k, v in (r.get("tiles") or {}).items() if k != "num_stages"})
        if "us" in r:
            print(f"{r['op']:16s} {r['M']:2d} {r['variant']:26s} {tiles:34s} {r['us']:8.1f} {r['GBps']:7.0f} "
                  f"{r['hbm_frac']:5.2f} {r['rel_err_f64']:8.1e}")
        else:
            print(f"{r['op']:16s} {r['M']:2d} {r['variant']:26s} {tiles:34s} failed: {r['error'][:60]}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
        print("wrote", args.out)


if __name__ == "__main__":
    main()
