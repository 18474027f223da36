"""The calculator's tables and plot in docs/evidence.md: V4 against DeepSeek-V3.2 under each convention.

    python3 bench/evidence_tables.py                       # prints the markdown tables
    python3 bench/evidence_tables.py --plot docs/img/evidence_ratios.png

Everything here is `dsv4.flops` (the same numbers `dsv4 flops` / `dsv4 kv` print); no measurement.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from dsv4.config import preset  # noqa: E402
from dsv4.flops import (REPORT_CLAIMS, V32Config, compare, inference_flops, kv_bytes,  # noqa: E402
                        plot_ratios)

M = 1 << 20
MODELS = ("deepseek-v4-flash", "deepseek-v4-pro")


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def mark(x: float, claim: float) -> str:
    return pct(x) + ("" if abs(x - claim) <= 0.03 else " ✗")


def flops_conventions() -> list[str]:
    v32 = V32Config()
    rows = ["| position | precision | Flash FLOPs | Pro FLOPs | V3.2 per token | within ±3 points of both |",
            "|---|---|---|---|---|---|"]
    for position in ("last", "average"):
        for precision in ("raw", "fp8", "fp8-hopper"):
            r = {m: compare(preset(m), v32, M, position=position, precision=precision) for m in MODELS}
            ok = all(abs(r[m]["flops_ratio"] - REPORT_CLAIMS[m][0]) <= 0.03 for m in MODELS)
            rows.append(f"| {position} | {precision} | {mark(r['deepseek-v4-flash']['flops_ratio'], 0.10)} | "
                        f"{mark(r['deepseek-v4-pro']['flops_ratio'], 0.27)} | "
                        f"{r['deepseek-v4-pro']['flops_reference'] / 1e12:.3f} TFLOP | {'yes' if ok else 'no'} |")
    return rows


def flops_other_sensitivities() -> list[str]:
    """One convention changed at a time from the headline (last, fp8)."""
    v32 = V32Config()
    base = {m: compare(preset(m), v32, M)["flops_ratio"] for m in MODELS}
    rows = ["| change from the headline (decode step at 2^20, FP8-equivalent) | Flash | Pro |", "|---|---|---|",
            f"| none (headline) | {pct(base['deepseek-v4-flash'])} | {pct(base['deepseek-v4-pro'])} |"]

    def row(name, fn):
        vals = [fn(m) for m in MODELS]
        rows.append(f"| {name} | {mark(vals[0], 0.10)} | {mark(vals[1], 0.27)} |")

    row("1M = 10^6 tokens instead of 2^20", lambda m: compare(preset(m), v32, 10 ** 6)["flops_ratio"])
    row("MTP block included in both", lambda m: compare(preset(m), v32, M, with_mtp=True)["flops_ratio"])

    def no_proj(m):
        f = inference_flops(preset(m), M)
        g = inference_flops(v32, M)
        keep = ("attention_core", "indexer", "compressor")
        return sum(f.term(t, "fp8") for t in keep) / sum(g.term(t, "fp8") for t in keep)
    row("attention only (core + indexer + compressor; no projections, MoE, head)", no_proj)

    def idx_fp8(m):  # V4's indexer scores counted at FP8 like V3.2's
        f, g = inference_flops(preset(m), M), inference_flops(v32, M)
        extra = f.terms["indexer"].get("fp4", 0.0) * 0.5
        return (f.total("fp8") + extra) / g.total("fp8")
    row("V4 indexer scores at FP8 (not FP4)", idx_fp8)

    def experts_fp8(m):
        return compare(preset(m).with_(expert_dtype="fp8"), v32, M)["flops_ratio"]
    row("V4 routed experts FP8 (not FP4)", experts_fp8)
    return rows


def kv_table() -> list[str]:
    v32 = V32Config()
    rows = ["| format | Flash B/token | Pro B/token | V3.2 B/token | Flash at 2^20 | Pro at 2^20 | V3.2 at 2^20 | Flash | Pro |",
            "|---|---|---|---|---|---|---|---|---|"]
    for fmt in ("fp8", "bf16"):
        f, p, v = (kv_bytes(preset(MODELS[0]), M, fmt), kv_bytes(preset(MODELS[1]), M, fmt), kv_bytes(v32, M, fmt))
        gib = lambda r: f"{r['total'] / 2**30:.2f} GiB"  # noqa: E731
        rows.append(f"| {fmt} | {f['per_token']:,.0f} | {p['per_token']:,.0f} | {v['per_token']:,.0f} | {gib(f)} | "
                    f"{gib(p)} | {gib(v)} | {mark(f['total'] / v['total'], 0.07)} | {mark(p['total'] / v['total'], 0.10)} |")
    return rows


def breakdown() -> list[str]:
    v32 = V32Config()
    fcs = {"Flash": inference_flops(preset(MODELS[0]), M), "Pro": inference_flops(preset(MODELS[1]), M),
           "V3.2": inference_flops(v32, M)}
    terms = ["attention_proj", "attention_core", "compressor", "indexer", "mhc", "moe", "head"]
    rows = ["| term (GFLOP per token, decode at 2^20, raw / FP8-equivalent) | Flash | Pro | V3.2 |", "|---|---|---|---|"]
    for t in terms + ["total"]:
        cells = []
        for fc in fcs.values():
            raw = fc.total("raw") if t == "total" else fc.term(t, "raw")
            eq = fc.total("fp8") if t == "total" else fc.term(t, "fp8")
            cells.append("–" if not raw else f"{raw / 1e9:,.1f} / {eq / 1e9:,.1f}")
        rows.append(f"| {t} | " + " | ".join(cells) + " |")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plot", default=None)
    args = ap.parse_args(argv)
    for title, rows in (("FLOPs ratio at 2^20 tokens by convention (✗: outside ±3 points of the claim)",
                         flops_conventions()),
                        ("Other conventions, one at a time", flops_other_sensitivities()),
                        ("Per-token FLOPs by term", breakdown()),
                        ("KV cache per sequence", kv_table())):
        print(f"\n### {title}\n")
        print("\n".join(rows))
    if args.plot:
        plot_ratios([(preset(m), m) for m in MODELS], (V32Config(), "deepseek-v3.2"), args.plot)
        print(f"\nwrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
