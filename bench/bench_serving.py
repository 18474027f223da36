"""What prefix caching and constrained decoding cost and save, through the Engine (CPU or GPU).

    python bench/bench_serving.py --device cuda --preset bench --prompt 4096,16384 --suffix 64 --out bench/results/serving.json
    python bench/bench_serving.py --device cpu --preset tiny --prompt 300 --suffix 16 --new 8 --json-vocab-preset tiny

Prefix caching: a prompt of P random tokens, then the same P tokens followed by `--suffix` new ones.
Reported per P: the time to the first token of the second request with and without the prefix cache
(the cached run prefills only the last partial block and the suffix), the tokens it took from the
cache, the bytes of one snapshot, and a check that both runs generate the same tokens (greedy).

Constrained decoding: ms per generated token for `--new` tokens of plain greedy decoding, with a
presence/frequency/repetition penalty, and with `response_format` json_object (`JsonObject`) over the
vocabulary of `--json-vocab-preset` (default `small`: the released 129,280-id vocabulary, random
weights), batch 1; the JSON tables' one-time build is timed apart.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import random_model  # noqa: E402
from dsv4.engine import Engine, Request, resolve_device, tokenizer_for  # noqa: E402


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_to_first_token(engine: Engine, prompt: list[int], new: int) -> tuple[float, list[int], int]:
    """Seconds from `add` to the first generated token, the generated ids, cached prompt tokens."""
    first = {}
    t0 = time.perf_counter()

    def sink(out):
        if out.token_ids and "t" not in first:
            sync(engine.device)
            first["t"] = time.perf_counter() - t0

    engine.add(Request(prompt, max_tokens=new, ignore_eos=True), sink)
    result = None
    while result is None:
        for out in engine.step():
            result = out.result or result
    return first["t"], result.token_ids, result.cached_tokens


def bench_prefix(model, device, lengths: list[int], suffix: int, new: int, cache_mb: int) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    for P in lengths:
        base = torch.randint(2, V, (P,), generator=g).tolist()
        longer = base + torch.randint(2, V, (suffix,), generator=g).tolist()
        out = {"prompt": P, "suffix": suffix}
        for name, nbytes in (("uncached", 0), ("cached", cache_mb << 20)):
            eng = Engine(model, max_batch=1, max_len=P + suffix + new + 1, prefix_cache_bytes=nbytes)
            time_to_first_token(eng, base, 1)                       # fills the cache (and warms up)
            ttft, ids, cached = time_to_first_token(eng, longer, new)
            out[f"ttft_s_{name}"], out[f"ids_{name}"], out[f"cached_{name}"] = ttft, ids, cached
            if nbytes:
                state = next(iter(eng.prefix_cache.entries.values()))[0]
                out["snapshot_mib"] = eng.cache.row_state_bytes(state) / 2 ** 20
                out["snapshots"] = len(eng.prefix_cache)
        out["same_tokens"] = out.pop("ids_uncached") == out.pop("ids_cached")
        out["cached_tokens"] = out.pop("cached_cached")
        out.pop("cached_uncached")
        out["speedup"] = out["ttft_s_uncached"] / out["ttft_s_cached"]
        rows.append(out)
        print(f"P={P:>6} +{suffix}: TTFT {out['ttft_s_uncached'] * 1e3:8.1f} ms -> {out['ttft_s_cached'] * 1e3:8.1f} ms "
              f"({out['speedup']:.1f}x), {out['cached_tokens']} tokens cached, snapshot "
              f"{out['snapshot_mib']:.2f} MiB, same tokens: {out['same_tokens']}")
    return rows


def bench_constraints(preset: str, device, dtype, new: int) -> dict:
    from dsv4.constraints import JsonObject, JsonVocab

    model = random_model(preset, seed=0, dtype=dtype).to(device)
    tok, note = tokenizer_for(model.config.vocab_size)
    V = model.config.vocab_size
    t0 = time.perf_counter()
    JsonVocab.of(tok, V)
    build = time.perf_counter() - t0
    prompt = tok.encode("Reply with a JSON object:", add_bos=True)
    out = {"preset": preset, "tokenizer": note, "json_tables_build_s": build}
    kinds = {"plain": {}, "penalties": dict(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.2),
             "json_object": "json"}
    for name, kw in kinds.items():
        eng = Engine(model, tok, max_batch=1, max_len=len(prompt) + new + 1)
        eng.generate([prompt], max_tokens=2)                       # warm-up
        req = Request(prompt, max_tokens=new, ignore_eos=name != "json_object",
                      **({} if kw == "json" else kw),
                      processors=[JsonObject(tok, V)] if kw == "json" else ())
        sync(device)
        t0 = time.perf_counter()
        res = eng.generate([req])[0]
        sync(device)
        dt = time.perf_counter() - t0
        out[f"ms_per_token_{name}"] = dt / max(len(res.token_ids), 1) * 1e3
        out[f"tokens_{name}"] = len(res.token_ids)
        if name == "json_object":
            out["json_text"] = res.text[:200]
        print(f"{name:>12}: {out[f'ms_per_token_{name}']:.2f} ms/token over {len(res.token_ids)} tokens")
    print(f"JSON tables for {V} ids built in {build:.2f} s")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp32"])
    ap.add_argument("--preset", default="bench", help="model preset for the prefix-cache runs (random weights)")
    ap.add_argument("--prompt", default="4096,16384", help="prompt lengths, comma separated")
    ap.add_argument("--suffix", type=int, default=64, help="new tokens after the shared prompt")
    ap.add_argument("--new", type=int, default=32, help="tokens generated per request")
    ap.add_argument("--cache-mb", type=int, default=4096, help="prefix cache size for the cached runs")
    ap.add_argument("--json-vocab-preset", default="small", help="preset whose vocabulary the JSON runs use")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    device, dtype = resolve_device(args.device, args.dtype)
    torch.manual_seed(0)
    model = random_model(args.preset, seed=0, dtype=dtype).to(device)
    lengths = [int(x) for x in args.prompt.split(",")]
    with torch.no_grad():
        prefix = bench_prefix(model, device, lengths, args.suffix, args.new, args.cache_mb)
        constraints = bench_constraints(args.json_vocab_preset, device, dtype, args.new)
    record = {"command": " ".join(sys.argv), "device": str(device), "dtype": str(dtype),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
              "torch": torch.__version__, "prefix_cache": prefix, "constraints": constraints}
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
