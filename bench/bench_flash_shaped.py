"""V4-Flash at its real shapes on one GPU: FP8/FP4 weights resident, Triton kernels, per-layer speed.

Three sections (`--only` picks some):
  kernels  the Triton FP8 GEMM and FP4 expert kernels against their PyTorch twins and an fp32 reference in
           bf16 at the released shapes (every FP8 matrix shape of a Flash layer; 256 experts of 4096 x 2048,
           6 per token) for M = 1, 32 and 8192 tokens: errors, time per call, weight GB/s (decode sizes)
           and TFLOP/s (prefill size);
  parity   a Flash-shaped random checkpoint with 4 layers (SWA, SWA, CSA, HCA) and 16 experts: logits of
           the quantised-resident model (Triton kernels) and of the dequantised bf16 model, both against
           the dequantised fp32 model (TF32 off), full forward of 2 x 300 tokens; then decode steps
           replayed from CUDA graphs against eager steps of the same quantised model;
  model    a Flash-shaped random checkpoint with K layers and 256 experts written shard by shard to a
           temporary folder (`dsv4 convert --random-like deepseek-v4-flash`), loaded quantised-resident:
           resident GiB (counted, analytic and CUDA-allocated), prefill tok/s of an 8K prompt, decode
           ms/step at batch 1 and 32 after 8K (CUDA graphs via dsv4.graphs.DecodeGraphs when they
           record, else eager: the JSON says which), per layer as total / K and as the slope between
           K/2 and K layers (the head, embedding and final norm drop out), and the ratio to SGLang's
           H200 FP8 Flash decode (TPOT 3.28 ms for 43 layers at concurrency 1 after 8K: 76.3 us/layer).

Disk: one Flash layer is ~3.6 GB in FP8/FP4 plus 2.1 GB of embedding and head, so K = 8 needs ~31 GB;
GPU memory ~3.6 GiB per layer. On the H200 (one GPU, 64 GiB disk):

    python3 bench/bench_flash_shaped.py --out bench_flash_shaped.json                 # all, K = 8
    python3 bench/bench_flash_shaped.py --only model --layers 12 --out flash12.json   # more layers

CPU check at a toy size (tiny preset with FP8/FP4 storage; kernels only under TRITON_INTERPRET=1):

    TRITON_INTERPRET=1 python3 bench/bench_flash_shaped.py --tiny
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsv4 import ops, quant  # noqa: E402
from dsv4.cache import DecodeCache  # noqa: E402
from dsv4.checkpoint import load_pretrained, write_random_checkpoint  # noqa: E402
from dsv4.commands.convert import random_like_config  # noqa: E402
from dsv4.graphs import DecodeGraphs  # noqa: E402
from dsv4.runlog import describe_environment  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
SGLANG_MS_PER_LAYER = 3.28 / 43   # SGLang, V4-Flash FP8 on H200, TPOT at concurrency 1 after 8K input
HBM_BYTES_PER_S = 4.3e12          # H200 measured (TARGETS.md)
BF16_FLOPS = 790e12


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="kernels,parity,model", help="sections, comma-separated")
    p.add_argument("--layers", type=int, default=8, help="main layers of the model section (default 8)")
    p.add_argument("--slope-from", type=int, default=None,
                   help="also time the decode with only the first N layers; the per-layer slope is (t(all) - "
                        "t(N)) / (layers - N) (default layers // 2; with --layers 6 --slope-from 2 the slope is "
                        "the mean of a CSA and an HCA layer, as 40 of V4-Flash's 43 layers)")
    p.add_argument("--context", type=int, default=8192, help="prompt tokens before decoding (default 8192)")
    p.add_argument("--batches", type=ints, default=[1, 32], help="decode batch sizes (default 1,32)")
    p.add_argument("--decode-steps", type=int, default=32, help="timed decode steps per batch size")
    p.add_argument("--kernel-tokens", type=ints, default=[1, 32, 8192], help="M of the kernel section")
    p.add_argument("--dir", default=None, help="folder for the generated checkpoints (default: a temporary one, "
                                               "removed at the end)")
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--tiny", action="store_true", help="toy sizes (CPU check of the script)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fp4-gemv-tiles", default=None,
                   help="JSON launch configuration of the FP4 decode GEMV (see bench/probe_quant_kernels.py)")
    p.add_argument("--fp4-decode-kernels", default="words",
                   help="FP4 decode GEMV variants to time the model's decode with, comma-separated: words, "
                        "words32 (the word kernels in fp32 arithmetic, fp4_moe.WORDS_MATH), bytes "
                        "(dsv4.kernels.fp4_moe.DECODE_KERNEL; the first is kept for the profile; rows of words "
                        "have the plain names, the others end in _words32 / _bytes)")
    p.add_argument("--pdl-modes", default=None, help="programmatic dependent launch of the kernels: on, off or "
                   "both (on,off: each decode measurement twice; dsv4.kernels.launch); default: as configured "
                   "(on, unless DSV4_PDL=0)")
    p.add_argument("--stream-modes", default=None, help="the decode graph's concurrent branches (dsv4.streams): on, "
                   "off or both (on,off); rows with them off end in _streams_off; default: as configured (on, "
                   "unless DSV4_STREAMS=0)")
    p.add_argument("--fp8-rsub", default=None, help="FP8 GEMV weight sub-tiles sharing x to time the decode with, "
                   "comma-separated among 1, 2, 4 (dsv4.kernels.fp8_gemm.GEMV_RSUB; rows of values other than "
                   "the configured one end in _rsubN); default: as configured")
    p.add_argument("--settings", default=None, metavar="NAME:MOD.ATTR=VALUE,...;NAME2:...",
                   help="named sets of module attributes to time the decode with, ';'-separated, each "
                        "NAME:module.ATTR=python-literal[,...] (e.g. 'merge8:dsv4.kernels.sparse_attention.MERGE="
                        "(8,128)'); the empty set 'base:' keeps the defaults; rows of a set end in _NAME, except "
                        "the first set's; each set's attributes are restored after its measurements")
    p.add_argument("--profile", default=None, metavar="FILE",
                   help="also profile one eager batch-1 decode step of the model section; kernel table to FILE")
    p.add_argument("--trace", default=None, metavar="PREFIX",
                   help="also record 3 CUDA-graph replays of the batch-1 decode step of the model section under "
                        "torch.profiler, once with the concurrent branches and once without: Chrome traces "
                        "PREFIX_streams_{on,off}.json and their kernel timelines summarised in the results")
    p.add_argument("--out", default="bench_flash_shaped.json")
    return p.parse_args(argv)


class Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def best(self, fn, repeats: int = 5, warmup: int = 1) -> float:
        """Best wall time of `repeats` calls, in seconds (after `warmup` untimed calls)."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return min(times)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max())


def med(a: torch.Tensor, b: torch.Tensor) -> float:
    """Median over positions of max |a - b| / max |b| (robust to a routing near-tie at one position)."""
    a, b = a.double(), b.double()
    return float(((a - b).abs().amax(-1) / b.abs().max()).median())


def model_config(args, layers: int, experts: int | None):
    if args.tiny:
        return random_like_config("tiny", layers=layers, mtp=0, experts=experts)
    return random_like_config("deepseek-v4-flash", layers=layers, mtp=0, experts=experts)


def write(cfg, folder: Path, device: torch.device, seed: int) -> dict:
    t0 = time.perf_counter()
    write_random_checkpoint(cfg, folder, seed=seed, device=device, fp8=True, fp4_experts=True, overwrite=True)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return {"write_s": time.perf_counter() - t0, "disk_gib": size / 2 ** 30}


# ----------------------------------------------------------------------------- kernels
def fp8_shapes(cfg) -> dict[str, tuple[int, int]]:
    D, H, Dh, Iq = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.q_lora_rank
    return {"wq_a": (Iq, D), "wq_b": (H * Dh, Iq), "wkv": (Dh, D), "wo_b": (D, cfg.o_groups * cfg.o_lora_rank),
            "indexer.wq_b": (cfg.index_n_heads * cfg.index_head_dim, Iq),
            "shared.w1": (cfg.moe_intermediate_size, D), "shared.w2": (D, cfg.moe_intermediate_size)}


def random_fp8(rows: int, cols: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return quant.quant_fp8(torch.randn(rows, cols, device=device) / cols ** 0.5)


def random_fp4_experts(E: int, D: int, I: int, device, chunk: int = 16):
    """Packed random experts w1, s1, w2, s2, w3, s3, quantised `chunk` experts at a time (bounded memory)."""
    out = []
    for rows, cols in ((I, D), (D, I), (I, D)):
        parts = [quant.quant_fp4(torch.randn(min(chunk, E - e) * rows, cols, device=device) * (3 / cols ** 0.5))
                 for e in range(0, E, chunk)]
        out += [torch.cat([p for p, _ in parts]).view(E, rows, cols // 2),
                torch.cat([s for _, s in parts]).view(E, rows, -1)]
    return out


@torch.no_grad()
def section_kernels(args, device, timer) -> dict:
    from dsv4.kernels.fp4_moe import fp4_experts
    from dsv4.kernels.fp8_gemm import fp8_linear

    cfg = model_config(args, 4, None)
    res = {"fp8": {}, "fp4": {}}
    for name, (N, K) in fp8_shapes(cfg).items():
        w, s = random_fp8(N, K, device)
        for M in args.kernel_tokens:
            x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
            ref = x.float() @ quant.dequant_fp8(w, s).t()                                     # fp32, TF32 off
            out, twin = fp8_linear(x, w, s), ops.fp8_linear_torch(x, w, s)
            t_k = timer.best(lambda: fp8_linear(x, w, s))
            t_t = timer.best(lambda: ops.fp8_linear_torch(x, w, s))
            row = {"kernel_vs_ref": rel(out, ref), "twin_vs_ref": rel(twin, ref), "kernel_vs_twin": rel(out, twin),
                   "kernel_us": t_k * 1e6, "twin_us": t_t * 1e6}
            row["kernel_weight_GBps"] = (N * K + s.numel()) / t_k / 1e9
            row["kernel_TFLOPs"] = 2 * M * N * K / t_k / 1e12
            res["fp8"][f"{name} {N}x{K} M={M}"] = row
            print(f"fp8 {name:13s} M={M:5d}: kernel {t_k * 1e6:8.1f} us ({row['kernel_weight_GBps']:7.1f} GB/s, "
                  f"{row['kernel_TFLOPs']:6.1f} TFLOP/s), twin {t_t * 1e6:8.1f} us; rel err kernel "
                  f"{row['kernel_vs_ref']:.1e} twin {row['twin_vs_ref']:.1e}", flush=True)
    E, D, I, K = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    ws = random_fp4_experts(E, D, I, device)
    expert_bytes = 3 * I * D // 2 + 3 * I * D // 32
    for M in args.kernel_tokens:
        x = torch.randn(M, D, device=device, dtype=torch.bfloat16)
        idx = torch.rand(M, E, device=device).argsort(-1)[:, :K]
        weight = torch.rand(M, K, device=device)
        out = fp4_experts(x, idx, weight, *ws, cfg.swiglu_limit)
        twin = ops.fp4_experts_torch(x, idx, weight, *ws, cfg.swiglu_limit)
        ref = ops.fp4_experts_torch(x.float(), idx, weight, *ws, cfg.swiglu_limit)           # fp32 matmuls
        t_k = timer.best(lambda: fp4_experts(x, idx, weight, *ws, cfg.swiglu_limit))
        t_t = timer.best(lambda: ops.fp4_experts_torch(x, idx, weight, *ws, cfg.swiglu_limit), repeats=2)
        used = int(idx.unique().numel())
        row = {"kernel_vs_ref": rel(out, ref), "twin_vs_ref": rel(twin, ref), "kernel_vs_twin": rel(out, twin),
               "kernel_us": t_k * 1e6, "twin_us": t_t * 1e6, "experts_used": used,
               "kernel_weight_GBps": used * expert_bytes / t_k / 1e9,
               "kernel_TFLOPs": 2 * 3 * M * K * I * D / t_k / 1e12}
        res["fp4"][f"E={E} D={D} I={I} top{K} M={M}"] = row
        print(f"fp4 experts M={M:5d}: kernel {t_k * 1e6:8.1f} us ({row['kernel_weight_GBps']:7.1f} GB/s over "
              f"{used} experts, {row['kernel_TFLOPs']:6.1f} TFLOP/s), twin {t_t * 1e6:9.1f} us; rel err kernel "
              f"{row['kernel_vs_ref']:.1e} twin {row['twin_vs_ref']:.1e}", flush=True)
    return res


# ----------------------------------------------------------------------------- parity
@torch.no_grad()
def section_parity(args, device, timer, folder: Path) -> dict:
    cfg = model_config(args, 4, 16 if not args.tiny else 8)
    res = write(cfg, folder, device, args.seed)
    S = 300 if not args.tiny else 40
    ids = torch.randint(0, cfg.vocab_size, (2, S), generator=torch.Generator().manual_seed(1)).to(device)
    logits = {}
    for name, dtype, quantized in (("fp32", torch.float32, False), ("bf16", torch.bfloat16, False),
                                   ("quantised_bf16", torch.bfloat16, True)):
        m = load_pretrained(folder, device=device, dtype=dtype, quantized=quantized)
        logits[name] = m(ids).float()
        if quantized:
            res["describe"] = quant.describe(m)
            res.update(decode_parity(m, ids, args))
        del m
        if device.type == "cuda":
            torch.cuda.empty_cache()
    shutil.rmtree(folder)
    ref = logits["fp32"]
    for name in ("bf16", "quantised_bf16"):
        res[f"{name}_vs_fp32"] = {"max": rel(logits[name], ref), "median": med(logits[name], ref),
                                  "argmax_agree": float((logits[name].argmax(-1) == ref.argmax(-1)).float().mean())}
    res["quantised_vs_bf16_median"] = med(logits["quantised_bf16"], logits["bf16"])
    print("parity:", json.dumps({k: v for k, v in res.items() if k.endswith(("fp32", "median"))}), flush=True)
    return res


def decode_parity(model, ids: torch.Tensor, args) -> dict:
    """Decode steps replayed from CUDA graphs against eager steps, from the same prefilled state."""
    B, S = ids.shape
    n = 8
    caches = [DecodeCache(model.config, B, S + n + 1, device=ids.device, dtype=torch.bfloat16) for _ in range(2)]
    rows = torch.arange(B, device=ids.device)
    outs = []
    for cache, graphs in zip(caches, (False, True)):
        first = model(ids, cache=cache, last_only=True)
        step = DecodeGraphs(model, cache, enabled=graphs and ids.device.type == "cuda")
        nxt, seq = first.argmax(-1, keepdim=True), []
        for _ in range(n):
            logits = step(nxt, rows)
            seq.append(logits.float())
            nxt = logits.argmax(-1, keepdim=True)
        outs.append((torch.stack(seq, 1), step))
    recorded = outs[1][1].graphs.get(B) is not None
    return {"decode_graph_vs_eager": rel(outs[1][0], outs[0][0]), "decode_graph_recorded": recorded}


# ----------------------------------------------------------------------------- the K-layer model
@torch.no_grad()
def section_model(args, device, timer, folder: Path) -> dict:
    cfg = model_config(args, args.layers, None)
    res = {"layers": cfg.num_hidden_layers, "experts": cfg.n_routed_experts, "config_ratios": list(cfg.compress_ratios)}
    res.update(write(cfg, folder, device, args.seed))
    print(f"wrote {res['disk_gib']:.1f} GiB in {res['write_s']:.0f} s", flush=True)
    t0 = time.perf_counter()
    model = load_pretrained(folder, device=device, dtype=torch.bfloat16, quantized=True)
    timer.sync()
    res["load_s"] = time.perf_counter() - t0
    counted = quant.resident_bytes(model)
    res["resident_gib"] = counted["total"] / 2 ** 30
    res["resident_bytes"] = counted
    res["analytic_bytes_equal"] = counted == quant.analytic_resident_bytes(model.config, torch.bfloat16, fp8=True,
                                                                        fp4_experts=True)
    if device.type == "cuda":
        res["cuda_allocated_gib"] = torch.cuda.memory_allocated(device) / 2 ** 30
    res["describe"] = quant.describe(model)
    print(res["describe"], flush=True)

    P, steps, Bmax = args.context, args.decode_steps, max(args.batches)
    cache = DecodeCache(cfg, Bmax, P + 2 * (steps + 2) * len(args.batches) + 8, device=device, dtype=torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (1, P), generator=torch.Generator().manual_seed(2)).to(device)
    row0 = torch.zeros(1, dtype=torch.long, device=device)
    out = {}

    def prefill():
        cache.reset(row0)
        out["logits"] = model(ids, cache=cache, rows=row0, last_only=True)

    t = timer.best(prefill, repeats=2, warmup=1 if not args.tiny else 0)
    res["prefill_tok_s"] = P / t
    res["prefill_s"] = t
    if device.type == "cuda":
        res["peak_gib_after_prefill"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    print(f"prefill {P} tokens: {t:.2f} s, {P / t:,.0f} tok/s", flush=True)
    copy_row(cache, 0, range(1, Bmax))            # every row continues the same 8K prefix

    from dsv4 import streams
    from dsv4.kernels import fp4_moe, fp8_gemm, launch
    full = list(model.layers)
    half = args.slope_from if args.slope_from is not None else max(1, len(full) // 2)
    K = len(full)
    variants = args.fp4_decode_kernels.split(",")
    configured = launch.ENABLED
    pdl_modes = args.pdl_modes.split(",") if args.pdl_modes else ["on" if configured else "off"]
    branches = streams.ENABLED
    stream_modes = args.stream_modes.split(",") if args.stream_modes else ["on" if branches else "off"]
    rsub0 = fp8_gemm.GEMV_RSUB
    rsubs = [int(v) for v in args.fp8_rsub.split(",")] if args.fp8_rsub else [rsub0]
    math = fp4_moe.WORDS_MATH
    settings = parse_settings(args.settings)
    for (sname, attrs), variant, pdl, side, rsub in itertools.product(settings, variants, pdl_modes,
                                                                      stream_modes, rsubs):
        saved = {k: getattr(*k) for k in attrs}
        for (module, attr), value in attrs.items():
            setattr(module, attr, value)
        fp8_gemm.GEMV_RSUB = rsub
        fp4_moe.DECODE_KERNEL = "words" if variant == "words32" else variant
        fp4_moe.WORDS_MATH = "fp32" if variant == "words32" else math
        launch.ENABLED = pdl == "on"
        streams.ENABLED = side == "on"
        key = (("" if variant == "words" else f"_{variant}") + ("" if pdl == "on" else "_pdl_off")
               + ("" if side == "on" else "_streams_off") + ("" if rsub == rsub0 else f"_rsub{rsub}")
               + ("" if sname == settings[0][0] else f"_{sname}"))
        dec = res[f"decode{key}"] = {}
        for k in sorted({len(full), half}, reverse=True):
            model.layers = torch.nn.ModuleList(full[:k])
            for B in args.batches:
                dec[f"layers={k} batch={B}"] = decode_ms(model, cache, B, steps, timer)
        model.layers = torch.nn.ModuleList(full)
        for B in args.batches:
            total = dec[f"layers={K} batch={B}"]["ms_per_step"]
            per = {"ms_per_layer_total_over_K": total / K}
            if half < K:
                slope = (total - dec[f"layers={half} batch={B}"]["ms_per_step"]) / (K - half)
                per["ms_per_layer_slope"] = slope
                per["ratio_to_sglang_per_layer"] = slope / SGLANG_MS_PER_LAYER
            per["ratio_to_sglang_total_over_K"] = per["ms_per_layer_total_over_K"] / SGLANG_MS_PER_LAYER
            res[f"per_layer_batch{B}{key}"] = per
            shown = pdl if device.type == "cuda" else "n/a (CPU)"
            print(f"decode ({variant} FP4 GEMV, PDL {shown}, streams {side}, FP8 RSUB {rsub}"
                  + (f", settings {sname}" if sname else "") + f") batch {B}: {total:.3f} ms/step for "
                  f"{K} layers; per layer {json.dumps(per)}", flush=True)
        for (module, attr), value in saved.items():
            setattr(module, attr, value)
    launch.ENABLED, streams.ENABLED, fp8_gemm.GEMV_RSUB = configured, branches, rsub0
    fp4_moe.DECODE_KERNEL = "words" if variants[0] == "words32" else variants[0]
    fp4_moe.WORDS_MATH = "fp32" if variants[0] == "words32" else math
    if args.profile and device.type == "cuda":
        res["profile"] = profile_decode(model, cache, Path(args.profile))
    if args.trace and device.type == "cuda":
        res["trace"] = trace_decode(model, cache, args.trace)
    return res


@torch.no_grad()
def trace_decode(model, cache: DecodeCache, prefix: str) -> dict:
    """Kernel timelines of 3 CUDA-graph replays of row 0's decode step, with and without the concurrent
    branches (`dsv4.streams`): {"streams_on": summary, "streams_off": summary} (`step_profile.timeline`)."""
    from dsv4 import streams
    from step_profile import timeline   # bench/ is the script's folder, first on sys.path
    rows = torch.zeros(1, dtype=torch.long, device=cache.device)
    start = cache.lengths[rows].clone()
    tok = torch.full((1, 1), 7, dtype=torch.long, device=cache.device)
    configured, out = streams.ENABLED, {}
    for side in ("on", "off"):
        streams.ENABLED = side == "on"
        graphs = DecodeGraphs(model, cache)
        graphs(tok, rows)                       # eager warm-up, records the graph
        graphs(tok, rows)
        out[f"streams_{side}"] = s = timeline(lambda: graphs(tok, rows), f"{prefix}_streams_{side}.json", repeats=3)
        cache.lengths[rows] = start
        print(f"decode graph timeline, streams {side}: " + json.dumps({k: v for k, v in s.items() if k != "by_name"}),
              flush=True)
    streams.ENABLED = configured
    return out


@torch.no_grad()
def profile_decode(model, cache: DecodeCache, path: Path) -> dict:
    """One eager decode step of row 0 under torch.profiler: the kernel table (by device time) to `path`,
    and the summed kernel time and count (against the step's eager wall time)."""
    from step_profile import profile_once   # bench/ is the script's folder, first on sys.path
    rows = torch.zeros(1, dtype=torch.long, device=cache.device)
    start = cache.lengths[rows].clone()
    tok = torch.full((1, 1), 7, dtype=torch.long, device=cache.device)

    def step():
        cache.lengths[rows] = start
        model.decode_step(tok, cache, rows)
    step()
    table, busy, n = profile_once(step)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table)
    t0 = time.perf_counter()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    res = {"kernel_ms": busy, "kernels": n, "eager_wall_ms": (time.perf_counter() - t0) / 5 * 1e3, "table": str(path)}
    cache.lengths[rows] = start
    print(f"decode step profile: {json.dumps(res)}\n{table}", flush=True)
    return res


def copy_row(cache: DecodeCache, src: int, dst) -> None:
    """Give rows `dst` the state of row `src` (decode cost depends on lengths, not contents)."""
    dst = torch.as_tensor(list(dst), dtype=torch.long, device=cache.device)
    if not dst.numel():
        return
    for layer in cache.layers:
        layer.ring[dst] = layer.ring[src].clone()
        for s in layer.states():
            for t in (s.kv, s.score, s.entries):
                t[dst] = t[src].clone()
    cache.lengths[dst] = int(cache.lengths[src])


def decode_ms(model, cache: DecodeCache, B: int, steps: int, timer: Timer) -> dict:
    """ms per decode step for rows 0..B-1 (replayed from a CUDA graph when it records). Rows are rolled
    back to their starting length afterwards so that every measurement decodes after the same context."""
    rows = torch.arange(B, device=cache.device)
    start = cache.lengths[rows].clone()
    graphs = DecodeGraphs(model, cache)
    # a different token per row: with one token for all rows, hash-routed layers (and most others) send
    # every row to the same experts, and the batch reads 6 experts instead of a realistic spread
    nxt = torch.randint(2, model.config.vocab_size, (B, 1), device=cache.device,
                        generator=torch.Generator(device=cache.device).manual_seed(B))
    graphs(nxt, rows)                                            # eager warm-up, records the graph
    graphs(nxt, rows)
    mode = "graph" if graphs.enabled and graphs.graphs.get(B) is not None else "eager"

    def run():
        for _ in range(steps):
            graphs(nxt, rows)

    timer.sync()
    t = timer.best(run, repeats=2, warmup=0)
    cache.lengths[rows] = start
    return {"ms_per_step": t / steps * 1e3, "mode": mode, "context": int(start[0])}


def parse_settings(text: str | None) -> list[tuple[str, dict]]:
    """'NAME:mod.ATTR=literal,...;...' -> [(NAME, {(module, attr): value})]; None -> one empty set."""
    import ast
    import importlib
    if not text:
        return [("", {})]
    out = []
    for part in text.split(";"):
        name, sep, body = part.partition(":")
        if not sep or not name.strip().isidentifier():
            raise SystemExit(f"--settings: each set is NAME:module.ATTR=VALUE,...; got {part!r}")
        attrs = {}
        for item in filter(None, (x.strip() for x in _split_top(body))):
            target, eq, value = item.partition("=")
            mod, dot, attr = target.strip().rpartition(".")
            if not eq or not dot:
                raise SystemExit(f"--settings: {item!r} is not module.ATTR=VALUE")
            try:
                module = importlib.import_module(mod)
            except ImportError as e:
                raise SystemExit(f"--settings: {item!r}: {e}") from None
            try:
                literal = ast.literal_eval(value.strip())
            except (ValueError, SyntaxError):
                raise SystemExit(f"--settings: {item!r}: the value must be a Python literal (a number, a quoted "
                                 f"string, True/False/None, a tuple or list of them)") from None
            if not hasattr(module, attr):
                raise SystemExit(f"--settings: {mod} has no attribute {attr!r}")
            attrs[(module, attr)] = literal
        out.append((name.strip(), attrs))
    return out


def _split_top(body: str) -> list[str]:
    """Split on commas outside brackets (values may be tuples)."""
    parts, depth, cur = [], 0, ""
    for ch in body:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    if not set(args.fp4_decode_kernels.split(",")) <= {"words", "words32", "bytes"}:
        raise SystemExit(f"--fp4-decode-kernels takes words, words32 and/or bytes, comma-separated; got "
                         f"{args.fp4_decode_kernels!r}")
    if args.fp8_rsub and not set(args.fp8_rsub.split(",")) <= {"1", "2", "4"}:
        raise SystemExit(f"--fp8-rsub takes 1, 2 and/or 4, comma-separated; got {args.fp8_rsub!r}")
    for name, modes in (("--pdl-modes", args.pdl_modes), ("--stream-modes", args.stream_modes)):
        if modes and not set(modes.split(",")) <= {"on", "off"}:
            raise SystemExit(f"{name} takes on and/or off, comma-separated; got {modes!r}")
    parse_settings(args.settings)              # (checked here; applied in the model section)
    if args.tiny:
        args.layers, args.context = min(args.layers, 4), min(args.context, 64)
        args.batches, args.decode_steps = [1, 4], min(args.decode_steps, 4)
        args.kernel_tokens = [1, 5]
    if args.slope_from is not None and not 1 <= args.slope_from < args.layers:
        raise SystemExit(f"--slope-from must be at least 1 and below --layers ({args.layers}); got {args.slope_from}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.fp4_gemv_tiles:
        from dsv4.kernels import fp4_moe
        fp4_moe.TILES["gemv"] = json.loads(args.fp4_gemv_tiles)
    timer = Timer(device)
    sections = set(args.only.split(","))
    results = {"args": vars(args), "environment": describe_environment(device),
               "ops_backends": ops.backend_choices(device.type), "sglang_ms_per_layer": SGLANG_MS_PER_LAYER}
    def save():   # after every section, so that a later failure keeps the earlier results
        Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")

    if "kernels" in sections:
        if device.type == "cpu" and not ops.triton_available():
            results["kernels"] = "skipped: no triton"
        elif device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            results["kernels"] = "skipped: on CPU the kernels need TRITON_INTERPRET=1"
        else:
            results["kernels"] = section_kernels(args, device, timer)
        save()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        if "parity" in sections:
            results["parity"] = section_parity(args, device, timer, Path(tmp) / "parity")
            save()
        if "model" in sections:
            results["model"] = section_model(args, device, timer, Path(tmp) / "model")
            save()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
