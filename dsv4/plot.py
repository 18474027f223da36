"""PNG plots of a training run from its metrics.jsonl (matplotlib, Agg backend: no display needed).

`plot_run(run_dir)` writes into RUN_DIR/plots/:
  loss.png         train next-token loss (raw and smoothed), validation loss, MTP loss; phase bands
  lr.png           learning rate and MTP loss weight
  aux.png          balance loss, index (KL) loss, gradient norm (skipped steps marked)
  expert_load.png  one heat map per MoE layer: expert × step, colour = load × E (1 = balanced)
  throughput.png   tokens per second
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dsv4.runlog import read_metrics

_PHASE_COLORS = {"dense": None, "warmup": "tab:orange", "sparse": "tab:green"}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    if not pts:
        return np.zeros(0), np.zeros(0)
    s, v = zip(*pts)
    return np.asarray(s), np.asarray(v, dtype=float)


def _smooth(v: np.ndarray, alpha: float = 0.1) -> np.ndarray:
    out, m = np.empty_like(v), None
    for i, x in enumerate(v):
        m = x if m is None or not np.isfinite(m) else (1 - alpha) * m + alpha * x
        out[i] = m
    return out


def _phase_bands(ax, rows: list[dict]) -> None:
    """Shade the indexer warm-up and the sparse phase; label them once."""
    spans: list[list] = []
    for r in rows:
        ph = r.get("phase")
        if spans and spans[-1][0] == ph:
            spans[-1][2] = r["step"]
        else:
            spans.append([ph, r["step"], r["step"]])
    seen = set()
    for ph, a, b in spans:
        color = _PHASE_COLORS.get(ph)
        if color is None:
            continue
        ax.axvspan(a - 0.5, b + 0.5, color=color, alpha=0.08, lw=0,
                   label=None if ph in seen else f"{ph} phase")
        seen.add(ph)


def plot_loss(rows, path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    s, v = _series(rows, "loss")
    ax.plot(s, v, color="tab:blue", alpha=0.25, lw=1)
    ax.plot(s, _smooth(v), color="tab:blue", lw=1.8, label="train loss (EMA 0.1)")
    s, v = _series(rows, "mtp_loss")
    if len(s):
        ax.plot(s, _smooth(v), color="tab:purple", lw=1.2, alpha=0.8, label="MTP loss (token t+2, EMA)")
    s, v = _series(rows, "val_loss")
    if len(s):
        ax.plot(s, v, "o-", color="tab:red", lw=1.5, ms=4, label="validation loss")
    _phase_bands(ax, rows)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lr(rows, path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    s, v = _series(rows, "lr")
    ax.plot(s, v, color="tab:blue", label="learning rate")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax2 = ax.twinx()
    s, v = _series(rows, "mtp_weight")
    if len(s):
        ax2.plot(s, v, color="tab:purple", ls="--", label="MTP weight λ")
        ax2.set_ylabel("MTP weight")
        ax2.set_ylim(0, max(v.max() * 1.2, 0.01))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.legend(loc="lower left", bbox_to_anchor=(0.1, 0.15))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_aux(rows, path: Path, title: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    for ax, key, label in zip(axes, ("balance_loss", "index_loss", "grad_norm"),
                              ("balance loss Σ_layers Σ_i f_i P_i (1 per layer = balanced)",
                               "index KL (Σ over CSA layers)", "gradient norm (before clipping)")):
        s, v = _series(rows, key)
        if len(s):
            ax.plot(s, v, lw=1)
        ax.set_ylabel(key)
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
        _phase_bands(ax, rows)
    skipped = [r["step"] for r in rows if r.get("skipped")]
    for st in skipped:
        axes[2].axvline(st, color="red", lw=0.8)
    axes[-1].set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_expert_load(rows, path: Path, title: str) -> None:
    plt = _plt()
    loads = [r for r in rows if isinstance(r.get("expert_load"), dict)]
    names = list(dict.fromkeys(n for r in loads for n in r["expert_load"]))   # every layer, first-seen order
    if not names:
        return
    cols = min(4, len(names))
    nrows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols + 1, 2.6 * nrows + 0.4), squeeze=False,
                             layout="constrained")
    steps = [r["step"] for r in loads]
    im = None
    for ax, name in zip(axes.flat, names):
        E = len(next(r["expert_load"][name] for r in loads if name in r["expert_load"]))
        grid = np.full((E, len(loads)), np.nan)
        for j, r in enumerate(loads):
            if name in r["expert_load"] and sum(r["expert_load"][name]) > 0:
                grid[:, j] = np.asarray(r["expert_load"][name]) * E
        im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=2,
                       extent=(steps[0] - 0.5, steps[-1] + 0.5, E - 0.5, -0.5))
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("expert")
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"{title}: expert load × E (1 = balanced, ≥ 2 saturates)")
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_throughput(rows, path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    s, v = _series(rows, "tokens_per_s")
    ax.plot(s, v, color="tab:gray", alpha=0.4, lw=1)
    ax.plot(s, _smooth(v), color="tab:blue", lw=1.6, label="tokens/s (EMA 0.1)")
    _phase_bands(ax, rows)
    ax.set_xlabel("step")
    ax.set_ylabel("training tokens / s")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the run's PNGs (default RUN_DIR/plots); returns their paths."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{run_dir}/metrics.jsonl is empty: the run has not finished a step yet")
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    title = run_dir.name
    written = []
    for name, fn in (("loss", plot_loss), ("lr", plot_lr), ("aux", plot_aux),
                     ("expert_load", plot_expert_load), ("throughput", plot_throughput)):
        path = out / f"{name}.png"
        fn(rows, path, title)
        if path.exists():
            written.append(path)
    return written
