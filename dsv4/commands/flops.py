"""`dsv4 flops MODEL... [--context 4K,1M] [--vs deepseek-v3.2]`: per-token inference FLOPs by term.

MODEL is a checkpoint folder, a config.json, a preset name, or `deepseek-v3.2` (the report's
baseline; also a V3.2 config.json). Prints each term (attention projections, attention over the
window + top-k + HCA entries, KV compressors, lightning indexer, mHC, MoE, head) per token at each
context and the ratio to the reference model, under explicit conventions (`--position`,
`--precision`); `--json` for machine-readable output, `--plot` for the FLOPs and KV ratios against
context. The accounting is written down in docs/evidence.md and in `dsv4.flops`.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

CONTEXT_HELP = ("context length(s) in tokens, comma separated; K = 1024, M = 1024² (default 1M = 1,048,576)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="checkpoint folder, config.json, preset (e.g. deepseek-v4-pro) or deepseek-v3.2")
    p.add_argument("--context", default="1M", metavar="N[,N...]", help=CONTEXT_HELP)
    p.add_argument("--vs", default="deepseek-v3.2", metavar="MODEL",
                   help="reference model for the ratio (default deepseek-v3.2; 'none' for no ratio)")
    p.add_argument("--position", choices=["last", "average"], default="last",
                   help="'last': the token at position context−1, i.e. one decode step (default); "
                        "'average': the mean over positions 0..context−1 (prefill per token)")
    p.add_argument("--precision", choices=["raw", "fp8", "fp8-hopper"], default="fp8",
                   help="'fp8' (default): FP8-equivalent FLOPs (BF16 ×2, FP8 ×1, FP4 ×0.5); 'fp8-hopper': "
                        "FP4 ×1; 'raw': every FLOP counts 1")
    p.add_argument("--mtp", action="store_true", help="include the MTP block(s) (a speculative draft)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="write a plot of the FLOPs and KV ratios to --vs against context (4K to 1M)")
    p.add_argument("--kv-format", choices=["fp8", "bf16"], default="fp8",
                   help="KV storage format for the plot's KV ratio (see `dsv4 kv`)")


def parse_contexts(text: str) -> list[int]:
    from dsv4.cli import CLIError

    out = []
    for part in str(text).split(","):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", part)
        if not m:
            raise CLIError(f"--context: {part!r} is not a token count (examples: 4096, 4K, 1M, 4K,64K,1M)")
        n = float(m.group(1)) * {"": 1, "k": 1024, "m": 1024 ** 2}[m.group(2).lower()]
        if n < 1 or n != int(n):
            raise CLIError(f"--context: {part!r} must be a whole number of tokens >= 1")
        out.append(int(n))
    return out


def resolve_model(name: str):
    """(config, label) for a V4 folder/config.json/preset, `deepseek-v3.2`, or a V3.2 config.json."""
    from dsv4.cli import CLIError
    from dsv4.commands.info import resolve
    from dsv4.flops import REFERENCE_MODELS, V32Config

    if name in REFERENCE_MODELS:
        return REFERENCE_MODELS[name](), name
    path = Path(name)
    cfg_file = path / "config.json" if path.is_dir() else path
    if cfg_file.is_file() and cfg_file.suffix == ".json":
        try:
            d = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as exc:
            raise CLIError(f"{cfg_file} is not valid JSON ({exc})") from None
        if isinstance(d, dict) and (d.get("model_type") == "deepseek_v32" or "kv_lora_rank" in d):
            try:
                return V32Config.from_hf_config(d), str(path)
            except (TypeError, ValueError) as exc:
                raise CLIError(f"{cfg_file}: not a usable DeepSeek-V3.2 config: {exc}") from None
    cfg, _, what = resolve(name)
    return cfg, what.removeprefix("preset ")


def human_flops(x: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f} {unit}"
    return f"{x:.0f} "


def run(args: argparse.Namespace) -> int:
    from dsv4.flops import inference_flops

    contexts = parse_contexts(args.context)
    models = [resolve_model(m) for m in args.models]
    ref = None if args.vs.lower() == "none" else resolve_model(args.vs)
    records = []
    for cfg, label in models:
        for n in contexts:
            fc = inference_flops(cfg, n, position=args.position, with_mtp=args.mtp, name=label)
            rec = fc.to_dict(args.precision)
            if ref is not None:
                r = inference_flops(ref[0], n, position=args.position, with_mtp=args.mtp, name=ref[1])
                rec.update(reference=ref[1], reference_total=r.total(args.precision),
                           ratio=rec["total"] / r.total(args.precision))
            records.append(rec)
    if args.plot:
        from dsv4.flops import plot_ratios

        if ref is None:
            from dsv4.cli import CLIError
            raise CLIError("--plot draws ratios to a reference model; give --vs MODEL")
        plot_ratios([(c, lbl) for c, lbl in models], ref, args.plot, position=args.position,
                    precision=args.precision, kv_format=args.kv_format, with_mtp=args.mtp)
    if args.json:
        print(json.dumps(records, indent=1))
    else:
        print(format_records(records, args))
        if args.plot:
            print(f"wrote {args.plot}")
    return 0


def format_records(records: list[dict], args) -> str:
    lines = [f"per-token inference FLOPs ({'FP8-equivalent' if args.precision.startswith('fp8') else 'raw'}"
             f"{', FP4 at FP8 rate' if args.precision == 'fp8-hopper' else ''}; multiply-add = 2; "
             + ("the token at position context−1" if args.position == "last" else "mean over positions 0..context−1")
             + (", with MTP" if args.mtp else "") + ")"]
    for rec in records:
        lines.append(f"{rec['model']} at context {rec['context']:,}:")
        for term, v in sorted(rec["terms"].items(), key=lambda kv: -kv[1]):
            lines.append(f"  {term:<15} {human_flops(v):>10}FLOP  {100 * v / rec['total']:5.1f}%")
        lines.append(f"  {'total':<15} {human_flops(rec['total']):>10}FLOP")
        if "ratio" in rec:
            lines.append(f"  vs {rec['reference']}: {human_flops(rec['reference_total'])}FLOP → "
                         f"{100 * rec['ratio']:.1f}%")
    return "\n".join(lines)
