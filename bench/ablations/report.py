"""Tables and plots of the finished ablation runs:  python3 bench/ablations/report.py

Reads results/*/result.json and writes results/summary.json, results/summary.md and the plots
docs/img/evidence_ablation_{lr,attention,residual,optimizer,gain}.png.

Statistics over seeds: mean and sample standard deviation (n − 1). A difference to the V4 baseline
"exceeds the seed spread" when |mean difference| > std(variant) + std(V4); Welch's t is given too
(with 3 seeds per side, |t| > 4.3 is the two-sided 5% level at the smallest possible degrees of freedom).
"""
from __future__ import annotations

import json
import math
import pathlib
from collections import defaultdict

HERE = pathlib.Path(__file__).resolve().parent
IMG = HERE.parents[1] / "docs" / "img"
LABELS = {"v4": "V4 (hybrid CSA/HCA/SWA, mHC, Muon)", "dense": "full dense attention", "swa": "SWA only (window 16)",
          "hc": "unconstrained HC", "residual": "plain residual", "adamw": "AdamW for every parameter"}
STUDIES = {"attention": ("v4", "dense", "swa"), "residual": ("v4", "hc", "residual"), "optimizer": ("v4", "adamw")}


def load(out: pathlib.Path) -> tuple[list[dict], dict]:
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("*/result.json"))]
    tuned = json.loads((out / "tuned_lr.json").read_text()) if (out / "tuned_lr.json").exists() else {}
    return runs, tuned


def variant_of(run: dict) -> str:
    return run["name"].split("_lr")[0]


def stats(xs: list[float]) -> dict:
    n = len(xs)
    mean = sum(xs) / n if n else math.nan
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else math.nan
    return {"n": n, "mean": mean, "std": std, "values": xs}


def compare(a: dict, b: dict) -> dict:
    """Variant a against baseline b."""
    d = a["mean"] - b["mean"]
    se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"]) if a["n"] > 1 and b["n"] > 1 else math.nan
    return {"diff": d, "t": d / se if se and se > 0 else math.nan,
            "exceeds_spread": bool(abs(d) > a["std"] + b["std"]) if not math.isnan(se) else None}


def summarize(runs: list[dict], tuned: dict) -> dict:
    lr_for = {v: tuned.get("adamw" if v == "adamw" else "muon") for v in LABELS}
    groups = defaultdict(list)
    for r in runs:
        v = variant_of(r)
        if lr_for.get(v) is not None and abs(r["lr"] - lr_for[v]) <= 1e-12 * max(1.0, r["lr"]):
            groups[v].append(r)
    summary = {"tuned_lr": tuned, "variants": {}, "studies": {}, "lr_sweep": []}
    for v, rs in groups.items():
        rs.sort(key=lambda r: r["seed"])
        summary["variants"][v] = {
            "label": LABELS[v], "seeds": [r["seed"] for r in rs], "lr": rs[0]["lr"],
            "val": stats([r["val_loss"] for r in rs]), "heldout": stats([r["heldout_loss"] for r in rs]),
            "train_flops_per_step": rs[0]["train_flops_per_step"], "tokens": rs[0]["tokens"],
            "seconds": stats([r["seconds"] for r in rs]),
            "max_composite_gain": stats([r["gain"]["max_composite"] for r in rs if r.get("gain")]),
            "max_gain_during_training": stats([max(g["max_composite"] for g in r["gain_trace"])
                                               for r in rs if r.get("gain_trace")]),
        }
    base = summary["variants"].get("v4")
    for study, vs in STUDIES.items():
        rows = {}
        for v in vs:
            if v not in summary["variants"]:
                continue
            s = summary["variants"][v]
            rows[v] = {"val": s["val"], "heldout": s["heldout"]}
            if base and v != "v4":
                rows[v]["val_vs_v4"] = compare(s["val"], base["val"])
                rows[v]["heldout_vs_v4"] = compare(s["heldout"], base["heldout"])
        summary["studies"][study] = rows
    for r in runs:
        if r["seed"] == 0 and variant_of(r) in ("v4", "adamw"):
            summary["lr_sweep"].append({"optimizer": r["optimizer"], "lr": r["lr"], "val_loss": r["val_loss"],
                                        "heldout_loss": r["heldout_loss"]})
    summary["lr_sweep"].sort(key=lambda x: (x["optimizer"], x["lr"]))
    return summary


def fmt(s: dict) -> str:
    if not s or not s.get("n"):
        return "–"
    return f"{s['mean']:.4f} ± {s['std']:.4f}" if s["n"] > 1 else f"{s['mean']:.4f} (1 seed)"


def markdown(summary: dict) -> str:
    out = []
    for study, rows in summary["studies"].items():
        out += [f"\n#### {study}\n", "| variant | seeds | train GFLOP/step | val loss (Shakespeare) | Δ vs V4 (t) | "
                "held-out loss (KJV) | Δ vs V4 (t) |", "|---|---|---|---|---|---|---|"]
        for v, row in rows.items():
            s = summary["variants"][v]

            def delta(key):
                c = row.get(f"{key}_vs_v4")
                if not c:
                    return "–"
                mark = " **>spread**" if c["exceeds_spread"] else ""
                return f"{c['diff']:+.4f} ({c['t']:+.1f}){mark}"
            out.append(f"| {s['label']} (lr {s['lr']:g}) | {len(s['seeds'])} | {s['train_flops_per_step'] / 1e9:.2f} | "
                       f"{fmt(row['val'])} | {delta('val')} | {fmt(row['heldout'])} | {delta('heldout')} |")
    out += ["\n#### learning-rate sweep (seed 0)\n", "| optimizer | lr | val loss | held-out loss |", "|---|---|---|---|"]
    for r in summary["lr_sweep"]:
        out.append(f"| {r['optimizer']} | {r['lr']:g} | {r['val_loss']:.4f} | {r['heldout_loss']:.4f} |")
    gains = [(v, summary["variants"][v]) for v in ("v4", "hc") if v in summary["variants"]]
    if gains:
        out += ["\n#### composite Amax gain (max over sites and both directions; mean ± std over seeds)\n",
                "| variant | at the end | largest during training |", "|---|---|---|"]
        for v, s in gains:
            out.append(f"| {s['label']} | {fmt(s['max_composite_gain'])} | {fmt(s['max_gain_during_training'])} |")
    return "\n".join(out) + "\n"


def plots(runs: list[dict], summary: dict, img: pathlib.Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    img.mkdir(parents=True, exist_ok=True)
    written = []
    by_variant = defaultdict(list)
    for r in runs:
        v = variant_of(r)
        if v in summary["variants"] and abs(r["lr"] - summary["variants"][v]["lr"]) < 1e-12:
            by_variant[v].append(r)
    for study, vs in STUDIES.items():
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        for i, v in enumerate(v for v in vs if v in by_variant):
            rs = by_variant[v]
            steps = [c["step"] for c in rs[0]["curve"]]
            vals = np.array([[c["val_loss"] for c in r["curve"]] for r in rs if len(r["curve"]) == len(steps)])
            m, s = vals.mean(0), vals.std(0, ddof=1) if len(vals) > 1 else np.zeros(len(steps))
            a.plot(steps, m, "o-", color=f"C{i}", label=f"{LABELS[v]} (n={len(vals)})")
            a.fill_between(steps, m - s, m + s, color=f"C{i}", alpha=0.2)
            sv = summary["variants"][v]
            for j, key in enumerate(("val", "heldout")):
                st = sv[key]
                b.errorbar([j + 0.25 * (i - 1)], [st["mean"]], yerr=[st["std"] if st["n"] > 1 else 0], fmt="o",
                           color=f"C{i}", capsize=4, label=LABELS[v] if j == 0 else None)
                b.plot([j + 0.25 * (i - 1)] * len(st["values"]), st["values"], ".", color=f"C{i}", alpha=0.5)
        a.set_xlabel("step")
        a.set_ylabel("validation loss (held-out Shakespeare)")
        a.set_title(f"{study}: validation loss, mean ± std over seeds", fontsize=10)
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
        b.set_xticks([0, 1], ["held-out Shakespeare", "King James (Genesis, John)"])
        b.set_ylabel("final loss (nats/token)")
        b.set_title("final losses: mean ± std, dots = seeds", fontsize=10)
        b.grid(alpha=0.3)
        b.legend(fontsize=8)
        fig.tight_layout()
        path = img / f"evidence_ablation_{study}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    if summary["lr_sweep"]:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for i, opt in enumerate(("muon", "adamw")):
            pts = [r for r in summary["lr_sweep"] if r["optimizer"] == opt]
            ax.plot([p["lr"] for p in pts], [p["val_loss"] for p in pts], "o-", color=f"C{i}",
                    label=f"{'Muon (+AdamW for vectors, embedding, head)' if opt == 'muon' else 'AdamW for all'}")
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel("validation loss (seed 0)")
        ax.set_title("learning-rate sweep", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = img / "evidence_ablation_lr.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    gain_runs = {v: by_variant[v] for v in ("v4", "hc") if by_variant.get(v)}
    if gain_runs:
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        for i, (v, rs) in enumerate(gain_runs.items()):
            for j, r in enumerate(rs):
                g = r["gain"]
                sites = range(len(g["composite_forward"]))
                a.plot(sites, g["composite_forward"], "-", color=f"C{i}", alpha=0.8,
                       label=f"{LABELS[v]}, forward" if j == 0 else None)
                a.plot(sites, g["composite_backward"], "--", color=f"C{i}", alpha=0.8,
                       label=f"{LABELS[v]}, backward" if j == 0 else None)
                tr = r["gain_trace"]
                b.plot([t["step"] for t in tr], [t["max_composite"] for t in tr], "o-", color=f"C{i}", alpha=0.8,
                       label=LABELS[v] if j == 0 else None)
        a.axhline(1, color="gray", lw=0.8)
        a.set_xlabel("mHC site l (attention and FFN of each layer)")
        a.set_ylabel("Amax gain of H_{L-1}···H_l (token mean)")
        a.set_title("composite gain at the end of training (each seed)", fontsize=10)
        b.set_xlabel("step")
        b.set_ylabel("max composite gain")
        b.set_title("largest composite gain during training", fontsize=10)
        for ax in (a, b):
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = img / "evidence_ablation_gain.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    return written


def write_report(out: pathlib.Path, img: pathlib.Path = IMG) -> dict:
    runs, tuned = load(out)
    if not runs:
        raise SystemExit(f"no finished runs under {out}")
    summary = summarize(runs, tuned)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    md = markdown(summary)
    (out / "summary.md").write_text(md)
    print(md)
    for p in plots(runs, summary, img):
        print(f"wrote {p}")
    return summary


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=pathlib.Path, default=HERE / "results", help="the runs' folder")
    ap.add_argument("--img", type=pathlib.Path, default=IMG, help="where the PNGs go")
    args = ap.parse_args(argv)
    write_report(args.out, args.img)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
