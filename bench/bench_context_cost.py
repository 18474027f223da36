"""KV bytes per sequence and decode ms/token from 4K to 1M tokens of context, next to the calculator.

    python3 bench/bench_context_cost.py --out bench/results/context_cost_DATE_h200.json \\
        --plot docs/img/evidence_context_cost.png                    # CUDA, `bench` preset, bf16
    python3 bench/bench_context_cost.py --smoke                      # CPU check: `tiny` preset, 256…4K
    python3 bench/bench_context_cost.py --from results.json --plot out.png   # plot a recorded run

For each context L (default 4K, 16K, 64K, 256K, 1M): a `DecodeCache` of one row with room for L plus
the timed steps; its allocated bytes (`DecodeCache.nbytes()`) next to `dsv4.flops.kv_bytes` (bf16,
allocated window, MTP block included; the two must agree exactly); the cache then holds L tokens, and
`--steps` greedy decode steps (`Transformer.decode_step`, through `dsv4.graphs.DecodeGraphs` with
`--graphs`) are timed after `--warmup` untimed ones.

How the cache comes to hold L tokens (`--fill`): "prefill" runs the prompt through the model in chunks
of `--chunk` tokens; "random" writes random entries of the right shapes into every layer's window ring,
compressed entries, indexer keys and compressor state and sets the row length to L, which is what a
decode step reads: its cost depends on the state sizes only, never on the values (the decode step has
static shapes: it scores every indexer key, takes the top-k and attends every HCA entry of the row's
buffer under a visibility mask). "auto" (default) prefills up to `--prefill-max` tokens and fills
randomly beyond; each row of the output says which. `--check-fill` also times the smallest context
both ways, to show that the fill does not change the decode cost.

Calculator columns: `flops_per_token` (`dsv4.flops.inference_flops`, raw FLOPs of one decode step at
position L) and `bytes_read_per_token` (weights of the active parameters in bf16, plus the entries a
decode step reads: window, CSA top-k entries and every indexer key, every HCA entry). The plot draws
measured ms/token next to those two curves scaled to the measurement at the smallest context, so the
growth with context of the measurement and of the model can be compared directly.
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsv4.cache import DecodeCache  # noqa: E402
from dsv4.config import ModelConfig, preset  # noqa: E402
from dsv4.flops import context_label, inference_flops, kv_bytes  # noqa: E402
from dsv4.model import Transformer  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_contexts(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().upper()
        mult = {"K": 1 << 10, "M": 1 << 20}.get(part[-1:], 1)
        out.append(int(float(part.rstrip("KM")) * mult))
    return out


# ----------------------------------------------------------------------------- calculator side
def bytes_read_per_token(cfg: ModelConfig, context: int, dtype_bytes: int = 2) -> float:
    """Bytes one decode step at `context` reads: active weights + the cached entries it looks at."""
    total = cfg.param_counts()["active"] * dtype_bytes
    W, Dh, Di = cfg.sliding_window, cfg.head_dim, cfg.index_head_dim
    for i in range(cfg.num_hidden_layers):
        m = cfg.layer_ratio(i)
        total += min(W, context) * Dh * dtype_bytes
        if m == 4:
            total += (context // 4) * Di * dtype_bytes + min(cfg.index_topk, context // 4) * Dh * dtype_bytes
        elif m:
            total += (context // m) * Dh * dtype_bytes
    return float(total)


# ----------------------------------------------------------------------------- filling the cache
@torch.no_grad()
def fill_random(cache: DecodeCache, length: int, gen: torch.Generator) -> None:
    """Random entries of the right shapes in every layer state of row 0, row length `length`."""
    for layer in cache.layers:
        layer.ring.copy_(torch.randn(layer.ring.shape, generator=gen).to(layer.ring))
        for s in layer.states():
            n = min(length // layer.ratio, s.entries.shape[1])          # complete windows only
            s.entries[:, :n] = torch.randn((s.entries.shape[0], n, s.entries.shape[2]), generator=gen).to(s.entries)
            s.kv.copy_(torch.randn(s.kv.shape, generator=gen).to(s.kv))
            s.score.copy_(torch.randn(s.score.shape, generator=gen).to(s.score))
    cache.lengths.fill_(length)
    cache.mtp_lengths.fill_(length)


@torch.no_grad()
def fill_prefill(model: Transformer, cache: DecodeCache, length: int, chunk: int, gen: torch.Generator) -> float:
    """Prefill a random prompt of `length` tokens in chunks; returns the seconds it took."""
    dev = cache.device
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=gen).to(dev)
    sync(dev)
    t = time.perf_counter()
    for a in range(0, length, chunk):
        model(ids[:, a:a + chunk], cache=cache, last_only=True)
    sync(dev)
    return time.perf_counter() - t


def sync(dev) -> None:
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize(dev)


# ----------------------------------------------------------------------------- one context
@torch.no_grad()
def measure(model: Transformer, cfg: ModelConfig, L: int, args, fill: str) -> dict:
    dev, dtype = torch.device(args.device), DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(L)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    max_len = L + args.warmup + args.steps
    cache = DecodeCache(cfg, 1, max_len, device=dev, dtype=dtype)
    row = {"context": L, "max_len": max_len, "fill": fill, "allocated_bytes": cache.nbytes()}
    # the calculator's "bf16" layout is the allocator's: compare where the cache holds bf16 entries
    row["calculator_allocated_bytes"] = (kv_bytes(cfg, max_len, "bf16", allocated=True, with_mtp=True)["total"]
                                         if dtype == torch.bfloat16 else None)
    row["calculator_kv_bytes_at_context"] = kv_bytes(cfg, L, "bf16")["total"]
    row["calculator_kv_bytes_at_context_fp8"] = kv_bytes(cfg, L, "fp8")["total"]
    if fill == "prefill":
        row["prefill_seconds"] = fill_prefill(model, cache, L, args.chunk, gen)
    else:
        fill_random(cache, L, gen)
    step = model.decode_step
    if args.graphs:
        from dsv4.graphs import DecodeGraphs
        runner = DecodeGraphs(model, cache, compile=args.compile)
        step = lambda ids, c, rows: runner(ids, rows)                       # noqa: E731
    rows = torch.zeros(1, dtype=torch.long, device=dev)
    ids = torch.randint(0, cfg.vocab_size, (1, 1), generator=gen).to(dev)
    for _ in range(args.warmup):
        ids = step(ids, cache, rows).argmax(-1, keepdim=True)
    sync(dev)
    t = time.perf_counter()
    for _ in range(args.steps):
        ids = step(ids, cache, rows).argmax(-1, keepdim=True)
    sync(dev)
    sec = time.perf_counter() - t
    assert int(cache.lengths[0]) == L + args.warmup + args.steps, "the decode steps did not advance the row"
    row.update(ms_per_token=1e3 * sec / args.steps, tokens_per_s=args.steps / sec,
               flops_per_token=inference_flops(cfg, L, position="last").total("raw"),
               bytes_read_per_token=bytes_read_per_token(cfg, L, 2 if dtype == torch.bfloat16 else 4))
    if dev.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2 ** 30
    return row


# ----------------------------------------------------------------------------- plot
def plot_context_cost(result: dict, path: str) -> str:
    """Measured KV bytes and ms/token against context, over the calculator's curves."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted((r for r in result["rows"] if not r.get("check")), key=lambda r: r["context"])
    x = [r["context"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    a.plot(x, [r["allocated_bytes"] / 2 ** 20 for r in rows], "o", label="measured: DecodeCache.nbytes()")
    if rows[0].get("calculator_allocated_bytes"):
        a.plot(x, [r["calculator_allocated_bytes"] / 2 ** 20 for r in rows], "-", label="calculator (allocated, bf16)")
    a.plot(x, [r["calculator_kv_bytes_at_context_fp8"] / 2 ** 20 for r in rows], "--",
           label="calculator, released FP8/FP4 format")
    a.set_ylabel("KV cache per sequence (MiB)")
    a.set_yscale("log")
    a.set_title(f"KV bytes per sequence ({result['preset']}, {result['dtype']})", fontsize=10)
    ms = [r["ms_per_token"] for r in rows]
    fills = {r["fill"] for r in rows}
    b.plot(x, ms, "o-", label="measured decode ms/token" + (" (random fill above the prefilled lengths)"
                                                            if fills == {"prefill", "random"} else ""))
    for key, style, name in (("flops_per_token", "--", "∝ calculator FLOPs/token"),
                             ("bytes_read_per_token", ":", "∝ calculator bytes read/token")):
        b.plot(x, [ms[0] * r[key] / rows[0][key] for r in rows], style, label=name)
    b.set_ylabel("ms per decode step (batch 1)")
    b.set_ylim(bottom=0)
    b.set_title(f"decode cost against context ({result.get('device', '')})", fontsize=10)
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [context_label(n) for n in x])
        ax.set_xlabel("context (tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--contexts", default="4K,16K,64K,256K,1M")
    ap.add_argument("--fill", choices=["auto", "prefill", "random"], default="auto")
    ap.add_argument("--prefill-max", type=int, default=262144, help="auto: prefill up to this many tokens")
    ap.add_argument("--chunk", type=int, default=16384, help="prefill chunk (tokens)")
    ap.add_argument("--check-fill", action="store_true", help="time the smallest context with both fills")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--graphs", action="store_true", help="decode through CUDA graphs (dsv4.graphs)")
    ap.add_argument("--compile", action="store_true", help="with --graphs: torch.compile the step first")
    ap.add_argument("--smoke", action="store_true", help="CPU check: tiny preset, contexts 256,1K,4K, 4 steps")
    ap.add_argument("--out", default=None, help="write the JSON here")
    ap.add_argument("--plot", default=None, help="write the PNG here")
    ap.add_argument("--from", dest="from_json", default=None, help="plot a recorded JSON instead of measuring")
    args = ap.parse_args(argv)
    if args.from_json:
        result = json.loads(pathlib.Path(args.from_json).read_text())
        print(plot_context_cost(result, args.plot or "context_cost.png"))
        return 0
    if args.smoke:
        args.preset, args.device, args.contexts, args.steps, args.warmup = "tiny", "cpu", "256,1K,4K", 4, 1
        args.prefill_max, args.chunk, args.check_fill = 1024, 512, True
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available; run with --device cpu (e.g. --smoke) or on a GPU machine")
    cfg = preset(args.preset)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model = (model.to_dtype(DTYPES[args.dtype]) if args.dtype != "fp32" else model).to(args.device).eval()
    contexts = parse_contexts(args.contexts)
    result = {"preset": args.preset, "dtype": args.dtype, "device": device_name(args.device),
              "torch": torch.__version__, "date": datetime.date.today().isoformat(),
              "command": "python3 bench/bench_context_cost.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "steps": args.steps, "graphs": args.graphs, "rows": []}
    for i, L in enumerate(contexts):
        fill = args.fill if args.fill != "auto" else ("prefill" if L <= args.prefill_max else "random")
        fills = [fill] + (["random" if fill == "prefill" else "prefill"] if args.check_fill and i == 0 else [])
        for k, f in enumerate(fills):
            row = measure(model, cfg, L, args, f)
            row["check"] = k > 0
            result["rows"].append(row)
            print(f"{context_label(L):>6} fill {f:<7} KV {row['allocated_bytes'] / 2**20:10.2f} MiB "
                  f"(calculator {(row['calculator_allocated_bytes'] or 0) / 2**20:10.2f})  "
                  f"{row['ms_per_token']:8.2f} ms/token" + ("  [fill check]" if k else ""), flush=True)
            if row["calculator_allocated_bytes"] is not None and row["calculator_allocated_bytes"] != row["allocated_bytes"]:
                print(f"  note: the calculator's allocated bytes differ from DecodeCache.nbytes() by "
                      f"{row['allocated_bytes'] - row['calculator_allocated_bytes']:,} B")
    random_rows = [r["context"] for r in result["rows"] if r["fill"] == "random" and not r["check"]]
    if random_rows:
        print("note: contexts " + ", ".join(context_label(n) for n in random_rows) + " were filled with random "
              "entries of the right shapes (not prefilled); a decode step's cost depends only on the state sizes")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    if args.plot:
        print(f"wrote {plot_context_cost(result, args.plot)}")
    return 0


def device_name(dev: str) -> str:
    if torch.device(dev).type == "cuda":
        return torch.cuda.get_device_name(torch.device(dev))
    import platform
    return f"CPU ({platform.processor() or platform.machine()})"


if __name__ == "__main__":
    raise SystemExit(main())
