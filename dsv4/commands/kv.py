"""`dsv4 kv MODEL... [--context 4K,1M] [--format fp8|bf16] [--vs deepseek-v3.2]`: KV bytes per sequence.

MODEL as for `dsv4 flops`. Prints, per model and context, the KV cache of one sequence (compressed
entries, indexer keys, window ring, compressor state), its growth per token and the ratio to the
reference. `--format bf16` is what the reference code, transformers and `dsv4.cache` allocate;
`--format fp8` the released storage formats (report §2.3.4: FP8 non-rope dims, BF16 rope dims, FP4
indexer keys; V3.2: FlashMLA's FP8 cache). `--allocated` counts the whole preallocated window ring, as
`DecodeCache.nbytes()` does.
"""
from __future__ import annotations

import argparse
import json

from dsv4.commands.flops import CONTEXT_HELP, parse_contexts, resolve_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="checkpoint folder, config.json, preset (e.g. deepseek-v4-flash) or deepseek-v3.2")
    p.add_argument("--context", default="1M", metavar="N[,N...]", help=CONTEXT_HELP)
    p.add_argument("--format", choices=["fp8", "bf16"], default="fp8",
                   help="storage format: 'fp8' the released formats (default), 'bf16' everything BF16")
    p.add_argument("--vs", default="deepseek-v3.2", metavar="MODEL",
                   help="reference model for the ratio (default deepseek-v3.2; 'none' for no ratio)")
    p.add_argument("--batch", type=int, default=1, metavar="B", help="sequences (default 1)")
    p.add_argument("--allocated", action="store_true", help="count the full window ring even below its size")
    p.add_argument("--mtp", action="store_true", help="include the MTP block(s)' cache")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args: argparse.Namespace) -> int:
    from dsv4.cli import CLIError
    from dsv4.commands.info import human_bytes
    from dsv4.flops import kv_bytes

    if args.batch <= 0:
        raise CLIError(f"--batch must be a positive number of sequences, got {args.batch}")
    contexts = parse_contexts(args.context)
    models = [resolve_model(m) for m in args.models]
    ref = None if args.vs.lower() == "none" else resolve_model(args.vs)
    records = []
    for cfg, label in models:
        for n in contexts:
            rec = kv_bytes(cfg, n, args.format, with_mtp=args.mtp, allocated=args.allocated, name=label)
            rec["batch"], rec["batch_total"] = args.batch, args.batch * rec["total"]
            if ref is not None:
                r = kv_bytes(ref[0], n, args.format, with_mtp=args.mtp, allocated=args.allocated, name=ref[1])
                rec.update(reference=ref[1], reference_total=r["total"], ratio=rec["total"] / r["total"])
            records.append(rec)
    if args.json:
        print(json.dumps(records, indent=1))
        return 0
    lines = [f"KV cache per sequence ({args.format}: " + ("every value BF16" if args.format == "bf16" else
             "FP8 non-rope dims + BF16 rope dims, FP4 (V4) / FP8 (V3.2) indexer keys, with block scales") + ")"]
    for rec in records:
        e = rec["entry_bytes"]
        lines.append(f"{rec['model']} at context {rec['context']:,}: {human_bytes(rec['total'])} "
                     f"({rec['total']:,.0f} B; entry {e['main']:g} B, indexer key {e['index']:g} B)")
        lines.append(f"  growth {rec['per_token']:,.1f} B/token; fixed {human_bytes(rec['fixed'])}; "
                     + ", ".join(f"{k} {human_bytes(v)}" for k, v in rec["by_type"].items() if v))
        if args.batch > 1:
            lines.append(f"  batch of {args.batch}: {human_bytes(rec['batch_total'])}")
        if "ratio" in rec:
            lines.append(f"  vs {rec['reference']}: {human_bytes(rec['reference_total'])} → {100 * rec['ratio']:.1f}%")
    print("\n".join(lines))
    return 0
