"""Prefill and decode throughput of dsv4 (model + DecodeCache, and the continuous-batching Engine), and
optionally of transformers' DeepseekV4ForCausalLM on the same random config (`--peer`).

For every batch size B and prompt length P:
  * prefill: B random prompts of P tokens in one cached forward (last-token logits); tokens/s = B·P / time;
  * decode: `--decode-tokens` greedy steps of one token per row; tokens/s = B·steps / time, and ms per step;
  * engine: the same through `dsv4.engine.Engine` (admission, sampling, stop checks, streaming state);
    its decode rate counts the steps after the first one (which prefills).
On CUDA the peak memory and the weight traffic per decode step (all parameters read once) as a
fraction of the H200's measured 4.3 TB/s HBM bandwidth (TARGETS.md) are reported as well.

  python bench/bench_generate.py --device cuda --peer                       # the TARGETS.md comparison
  python bench/bench_generate.py --preset tiny --device cpu --batch 1,2 --prompt-lens 32,64 \\
      --decode-tokens 8 --peer                                              # CPU smoke check
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsv4.cache import DecodeCache  # noqa: E402
from dsv4.config import preset  # noqa: E402
from dsv4.engine import Engine, Request, resolve_device  # noqa: E402
from dsv4.graphs import DecodeGraphs  # noqa: E402
from dsv4.model import Transformer  # noqa: E402

HBM_BYTES_PER_S = 4.3e12  # H200, measured (TARGETS.md)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench", help="model config (default: bench, the TARGETS.md peer model)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--batch", type=ints, default=[1, 8, 32], help="batch sizes, comma-separated")
    p.add_argument("--prompt-lens", type=ints, default=[1024, 4096], help="prompt lengths, comma-separated")
    p.add_argument("--decode-tokens", type=int, default=64, help="decode steps timed per configuration")
    p.add_argument("--peer", action="store_true", help="also time transformers' DeepseekV4ForCausalLM")
    p.add_argument("--decode-modes", default=None,
                   help="dsv4 decode variants, comma-separated from eager,graph,compile (default: eager,graph "
                        "on CUDA, eager on CPU); each is a row named dsv4[-mode]")
    p.add_argument("--no-engine", action="store_true", help="skip the Engine rows")
    p.add_argument("--kv-cache", default="model", choices=["model", "fp8", "both"],
                   help="compressed entries in the model dtype, as FP8 rows, or rows for both (dsv4, dsv4-kv8)")
    p.add_argument("--speculative", action="store_true", help="Engine rows with MTP speculative decoding")
    p.add_argument("--repeats", type=int, default=1, help="timed repetitions (the best is kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_generate.json", help="JSON file for the results")
    return p.parse_args(argv)


class Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ----------------------------------------------------------------------------- dsv4
@torch.no_grad()
def bench_dsv4(model, ids: torch.Tensor, steps: int, timer: Timer, modes: list[str], kv_fp8: bool = False) -> dict:
    """One prefill, then `steps` greedy decode steps in each mode (eager calls of `model(..., cache=)`,
    `graph`: `DecodeGraphs` replays, `compile`: the compiled step replayed from graphs), one after the
    other on the same cache rows. A graph mode's first step (recording, compiling) is not timed. `kv_fp8`:
    the compressed entries stored as FP8 rows (`DecodeCache(kv_fp8=True)`)."""
    B, P = ids.shape
    cache = DecodeCache(model.config, B, P + (steps + 1) * len(modes) + 1, device=ids.device,
                        dtype=model.embed.weight.dtype, kv_fp8=kv_fp8)
    out = {}

    def prefill():
        out["logits"] = model(ids, cache=cache, last_only=True)

    res = {"prefill_s": timer(prefill), "decode": {}}
    nxt = out["logits"].argmax(-1, keepdim=True)                               # [B, 1]
    rows = torch.arange(B, device=ids.device)
    for mode in modes:
        if mode == "eager":
            def step(x):
                return model(x, cache=cache, last_only=True)
        else:
            step_graph = DecodeGraphs(model, cache, enabled=ids.device.type == "cuda", compile=mode == "compile")
            t0 = time.perf_counter()
            nxt = step_graph(nxt, rows).argmax(-1, keepdim=True)                # records (and compiles)
            timer.sync()
            res.setdefault("setup_s", {})[mode] = time.perf_counter() - t0

            def step(x, g=step_graph):
                return g(x, rows)

        def decode():
            nonlocal nxt
            for _ in range(steps):
                nxt = step(nxt).argmax(-1, keepdim=True)

        res["decode"][mode] = timer(decode)
    return res


@torch.no_grad()
def bench_engine(model, ids: torch.Tensor, steps: int, timer: Timer, speculative: bool) -> dict:
    B, P = ids.shape
    engine = Engine(model, max_batch=B, max_len=P + steps + 2, prefill_chunk=B * P, speculative=speculative)
    for row in ids.tolist():
        engine.add(Request(row, max_tokens=steps, ignore_eos=True))
    t_first = timer(engine.step)  # admits and prefills every row, samples the first tokens, decodes once
    first = engine.stats["generated_tokens"]
    t_rest = timer(lambda: [engine.step() for _ in iter(engine.has_work, False)])
    res = {"prefill_s": t_first, "decode_s": t_rest, "decode_tokens": engine.stats["generated_tokens"] - first}
    if speculative:
        res["acceptance_rate"] = engine.acceptance_rate
    return res


# ----------------------------------------------------------------------------- transformers
def build_peer(cfg, device, dtype):
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    torch.manual_seed(0)
    return DeepseekV4ForCausalLM(DeepseekV4Config(**cfg.to_hf_config())).to(device=device, dtype=dtype).eval()


@torch.no_grad()
def bench_peer(hf, ids: torch.Tensor, steps: int, timer: Timer) -> dict:
    out = {}

    def prefill():
        r = hf(input_ids=ids, use_cache=True, logits_to_keep=1)
        out["past"], out["logits"] = r.past_key_values, r.logits[:, -1]

    t_prefill = timer(prefill)

    def decode():
        nxt, past = out["logits"].argmax(-1, keepdim=True), out["past"]
        for _ in range(steps):
            r = hf(input_ids=nxt, past_key_values=past, use_cache=True, logits_to_keep=1)
            nxt, past = r.logits[:, -1].argmax(-1, keepdim=True), r.past_key_values

    t_decode = timer(decode)
    return {"prefill_s": t_prefill, "decode_s": t_decode}


# ----------------------------------------------------------------------------- driver
def run_case(name: str, fn, B: int, P: int, steps: int, device, repeats: int, weight_bytes: int) -> list[dict]:
    """Rows for one (B, P): one per decode mode when `fn` reports several (`decode` = {mode: s})."""
    base = {"impl": name, "batch": B, "prompt": P, "decode_steps": steps}
    try:
        reset_peak(device)
        best = None
        for _ in range(repeats):
            r = fn()
            total = r["prefill_s"] + (sum(r["decode"].values()) if "decode" in r else r["decode_s"])
            if best is None or total < best[0]:
                best = (total, r)
    except torch.cuda.OutOfMemoryError:
        return [dict(base, error="out of memory")]
    best = best[1]
    variants = [(name if m == "eager" else f"{name}-{m}", s) for m, s in best.pop("decode").items()] \
        if "decode" in best else [(name, best.pop("decode_s"))]
    setup = best.pop("setup_s", {})
    rows = []
    for impl, decode_s in variants:
        row = dict(base, impl=impl, **best)
        n_decode = row.pop("decode_tokens", B * steps)
        step_s = decode_s / max(n_decode / B, 1)
        row.update({"decode_s": decode_s, "prefill_tok_s": B * P / best["prefill_s"], "decode_tok_s": n_decode / decode_s,
                    "decode_ms_per_step": 1000 * step_s, "peak_gib": peak_gib(device)})
        mode = impl.rsplit("-", 1)[-1]
        if mode in setup:
            row["setup_s"] = setup[mode]
        if device.type == "cuda":
            row["weights_hbm_fraction"] = weight_bytes / step_s / HBM_BYTES_PER_S
        rows.append(row)
    return rows


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(rows: list[dict]) -> None:
    head = f"{'impl':<16}{'batch':>6}{'prompt':>8}{'prefill tok/s':>15}{'decode tok/s':>14}{'ms/step':>9}" \
           f"{'peak GiB':>10}{'HBM frac':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['impl']:<16}{r['batch']:>6}{r['prompt']:>8}  {r['error']}")
            continue
        print(f"{r['impl']:<16}{r['batch']:>6}{r['prompt']:>8}{r['prefill_tok_s']:>15,.0f}{r['decode_tok_s']:>14,.1f}"
              f"{r['decode_ms_per_step']:>9.2f}{fmt(r['peak_gib'], '.2f'):>10}"
              f"{fmt(r.get('weights_hbm_fraction'), '.1%'):>10}")
    peers = {(r["batch"], r["prompt"]): r for r in rows if r["impl"] == "transformers" and "error" not in r}
    ours = [r for r in rows if r["impl"].startswith("dsv4") and "error" not in r and (r["batch"], r["prompt"]) in peers]
    if ours:
        print("\ndsv4 / transformers:")
        for r in ours:
            p = peers[(r["batch"], r["prompt"])]
            print(f"  {r['impl']:<16} batch {r['batch']:>3}, prompt {r['prompt']:>6}: "
                  f"prefill x{r['prefill_tok_s'] / p['prefill_tok_s']:.1f}, "
                  f"decode x{r['decode_tok_s'] / p['decode_tok_s']:.1f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = resolve_device(args.device, args.dtype)
    cfg = preset(args.preset)
    timer = Timer(device)
    torch.manual_seed(args.seed)
    model = Transformer(cfg).to(device).to_dtype(dtype).eval()
    model.pack_projections()          # inference: projection groups as one GEMM each
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    modes = (args.decode_modes or ("eager,graph" if device.type == "cuda" else "eager")).split(",")
    if not set(modes) <= {"eager", "graph", "compile"}:
        raise SystemExit(f"--decode-modes: choose from eager, graph, compile; got {args.decode_modes}")
    impls = []
    if args.kv_cache in ("model", "both"):
        impls.append(("dsv4", lambda ids: bench_dsv4(model, ids, args.decode_tokens, timer, modes)))
    if args.kv_cache in ("fp8", "both"):
        impls.append(("dsv4-kv8", lambda ids: bench_dsv4(model, ids, args.decode_tokens, timer, modes, kv_fp8=True)))
    if not args.no_engine:
        name = "dsv4-engine" + ("-mtp" if args.speculative else "")
        impls.append((name, lambda ids: bench_engine(model, ids, args.decode_tokens, timer, args.speculative)))
    if args.peer:
        hf = build_peer(cfg, device, dtype)
        impls.append(("transformers", lambda ids: bench_peer(hf, ids, args.decode_tokens, timer)))

    print(f"preset {args.preset}: {cfg.param_counts()['total'] / 1e6:.0f}M parameters, {device}, "
          f"{str(dtype).replace('torch.', '')}, torch {torch.__version__}", file=sys.stderr)
    g = torch.Generator().manual_seed(args.seed)
    warm = torch.randint(0, cfg.vocab_size, (1, 16), generator=g).to(device)
    for _, fn in impls:  # kernels, allocator, lazy init
        fn(warm)
    rows = []
    for P in args.prompt_lens:
        for B in args.batch:
            ids = torch.randint(0, cfg.vocab_size, (B, P), generator=g).to(device)
            for name, fn in impls:
                for row in run_case(name, lambda: fn(ids), B, P, args.decode_tokens, device, args.repeats,
                                    weight_bytes):
                    rows.append(row)
                    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}),
                          file=sys.stderr)
    print_table(rows)
    try:
        from dsv4.runlog import describe_environment

        env = describe_environment(device)
    except ImportError:
        env = {"torch": torch.__version__, "device": str(device)}
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "args": vars(args),
              "preset": args.preset, "dtype": str(dtype), "environment": env, "rows": rows}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
