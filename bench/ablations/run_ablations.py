"""Small-scale ablations of DeepSeek-V4's design choices, on CPU, at equal tokens and steps.

    nice -n 15 env OMP_NUM_THREADS=1 python3 bench/ablations/run_ablations.py all     # every study, resumable
    python3 bench/ablations/run_ablations.py lr                # the learning-rate sweep only (seed 0)
    python3 bench/ablations/run_ablations.py attention|residual|optimizer
    python3 bench/ablations/run_ablations.py attention --steps 480 --seeds 0 --out bench/ablations/results_long
    python3 bench/ablations/report.py                          # tables + plots from the finished runs

Studies (each variant × seeds 0, 1, 2; everything else equal):
  attention   V4 hybrid (SWA / CSA / HCA layers of the `tiny` preset)  vs  full dense causal attention
              (every layer sliding-window with the window = the sequence)  vs  SWA only (window 16)
  residual    mHC (release)  vs  unconstrained HC  vs  plain residual  (`ModelConfig.hc_mode`), with the
              mHC paper's composite Amax gain (`dsv4.diagnostics`)
  optimizer   Muon (+ AdamW for embeddings, norms, biases; the release)  vs  AdamW for every parameter,
              each at its best learning rate of the sweep `lr` ({1e-3, 3e-3, 1e-2}, seed 0; extended by
              a factor √10 when the best is at an edge)
The V4 variant (hybrid attention, mHC, Muon at its tuned lr) is shared by the three studies.

Setup: the `tiny` preset (4 layers SWA/CSA/HCA/CSA + an SWA MTP block, hidden 64, 8 experts top-2; 0.34M
active parameters), sequences of 512 tokens (HCA 128:1 has up to 4 entries, CSA up to 128 of which the
indexer picks 16), 2 rows per step, 120 steps (123K tokens; the budget of a shared 2-core machine), the
`tiny` recipe's schedule and phases (V4 variants: dense attention for 60 steps, indexer warm-up 7, sparse
53; variants without CSA layers have no phases). A 512-id byte-level BPE trained once on the bundled
Shakespeare; the same two held-out plays for every run. Validation: next-token loss on 64 rows of 512
tokens of those plays (`val_loss`), and on 64 rows of the King James Genesis and John (`heldout_loss`,
data/, see make_heldout.py). Runs write `results/<run>/result.json` and `metrics.jsonl`; finished runs
are skipped, so the command resumes where it stopped.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import time

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from dsv4 import data as D  # noqa: E402
from dsv4.config import preset  # noqa: E402
from dsv4.diagnostics import composite_gain, residual_maps  # noqa: E402
from dsv4.flops import train_flops_per_token  # noqa: E402
from dsv4.train import IGNORE, TrainConfig, Trainer, csa_attentions, moe_layers, set_phase  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"
HELDOUT = HERE / "data" / "kjv_genesis_john.jsonl.gz"
SEEDS = (0, 1, 2)
SEQ, ROWS, STEPS = 512, 2, 120
EVAL_EVERY, EVAL_BATCHES = 40, 32                  # 32 batches × 2 rows × 512 tokens = 32K tokens
LR_GRID = (1e-3, 3e-3, 1e-2)
LOCK = "/tmp/dsv4-cpu.lock"                        # "" to run without it
STUDIES = {"attention": ("v4", "dense", "swa"), "residual": ("v4", "hc", "residual"),
           "optimizer": ("v4", "adamw")}


# ----------------------------------------------------------------------------- configurations
def base_config(seed: int, lr: float, data: pathlib.Path) -> TrainConfig:
    """The `tiny` recipe's schedule on the `tiny` preset at sequence length 512."""
    return TrainConfig(
        name="ablation", model=preset("tiny"), data=str(data / "tokens"), tokenizer=str(data / "tokenizer"),
        seq_len=SEQ, micro_batch=ROWS, steps=STEPS, seed=seed, lr=lr, warmup_steps=STEPS // 10, decay_start=0.7,
        final_lr_ratio=0.1, weight_decay=0.1, bias_update_speed=0.01, dense_fraction=0.5,
        indexer_warmup_fraction=0.06, eval_every=EVAL_EVERY, eval_batches=EVAL_BATCHES, ckpt_every=10 ** 9,
        keep_checkpoints=1, device="cpu", tensorboard=False, threads=1)


def variant_config(variant: str, seed: int, lrs: dict, data: pathlib.Path) -> TrainConfig:
    """One variant: the V4 baseline with exactly one thing changed."""
    cfg = base_config(seed, lrs["adamw" if variant == "adamw" else "muon"], data)
    m = cfg.model
    no_csa = dict(dense_fraction=0.0, indexer_warmup_fraction=0.0)    # phases exist only for CSA layers
    all_swa = (0,) * len(m.compress_ratios)
    changes = {
        "v4": {},
        # every layer attends to its whole causal prefix: sliding window = the sequence length
        "dense": dict(no_csa, model=m.with_(compress_ratios=all_swa, sliding_window=SEQ)),
        "swa": dict(no_csa, model=m.with_(compress_ratios=all_swa)),          # the preset's window (16)
        "hc": dict(model=m.with_(hc_mode="hc")),
        "residual": dict(model=m.with_(hc_mode="residual")),
        "adamw": dict(optimizer="adamw"),
    }
    if variant not in changes:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(changes)}")
    return dataclasses.replace(cfg, **changes[variant])


# ----------------------------------------------------------------------------- shared data
def prepare_data(out: pathlib.Path) -> pathlib.Path:
    """Tokenizer, training/validation tokens and held-out tokens, made once for every run."""
    from dsv4.tokenizer import load_tokenizer, train_bpe

    data = out / "_data"
    if (data / "heldout" / "meta.json").exists():
        return data
    texts = [d["text"] for d in D.load_bundled_corpus()]
    tok = train_bpe(texts, preset("tiny").vocab_size)
    tok.save(data / "tokenizer")
    tok = load_tokenizer(data / "tokenizer")
    encode = lambda text: tok.encode(text, add_bos=True)  # noqa: E731
    D.prepare([D.BUNDLED], data / "tokens", encode, eos_id=tok.eos_id, val_docs=2, seed=0,
              tokenizer="bpe-512 (bundled corpus)", vocab_size=preset("tiny").vocab_size, progress=False)
    D.prepare([HELDOUT], data / "heldout", encode, eos_id=tok.eos_id, val_docs=0, seed=0,
              tokenizer="bpe-512 (bundled corpus)", vocab_size=preset("tiny").vocab_size, progress=False)
    return data


@torch.no_grad()
def heldout_loss(trainer: Trainer, data_dir: pathlib.Path) -> float:
    """Next-token loss on the first EVAL_BATCHES × ROWS rows of the held-out text (same rows every run)."""
    model = trainer.model
    model.eval()
    for attn in csa_attentions(model):
        attn.index_loss = False
    total, count = 0.0, 0
    for b in D.iterate_val(data_dir, ROWS, SEQ, max_batches=EVAL_BATCHES, split="train"):
        logits = model(b["input_ids"], segment_ids=b["doc_ids"].long(), positions=b["positions"])
        total += float(F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), ignore_index=IGNORE,
                                       reduction="sum"))
        count += int((b["labels"] != IGNORE).sum())
    for _, moe in moe_layers(model):
        moe.last_routing = None
    model.train()
    return total / count


def gain_of(trainer: Trainer, data_dir: pathlib.Path) -> dict:
    """Composite Amax gain on the first validation row (one selected sequence, as the mHC paper)."""
    b = next(D.iterate_val(data_dir, 1, SEQ, max_batches=1))
    model = trainer.model
    model.eval()
    for attn in csa_attentions(model):
        attn.index_loss = False
    maps, _ = residual_maps(model, b["input_ids"])
    for _, moe in moe_layers(model):
        moe.last_routing = None
    model.train()
    set_phase(model, trainer.cfg.phase_at(max(trainer.step - 1, 0)))
    return composite_gain([m[0] for m in maps])


# ----------------------------------------------------------------------------- one run
def run_one(name: str, cfg: TrainConfig, data: pathlib.Path, out: pathlib.Path) -> dict:
    run_dir = out / name
    done = run_dir / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    if run_dir.exists():  # an interrupted run: start it again
        import shutil
        shutil.rmtree(run_dir)
    print(f"[{time.strftime('%H:%M:%S')}] {name}: lr {cfg.lr:g}, optimizer {cfg.optimizer}, hc {cfg.model.hc_mode}, "
          f"ratios {cfg.model.compress_ratios}, window {cfg.model.sliding_window}", flush=True)
    with cpu_lock():
        return _train(name, cfg, data, run_dir)


def cpu_lock():
    """The machine's shared lock for long CPU work, held for one run at a time (others interleave)."""
    import contextlib
    import fcntl

    @contextlib.contextmanager
    def held():
        with open(LOCK, "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
    return held() if LOCK else contextlib.nullcontext()


def _train(name: str, cfg: TrainConfig, data: pathlib.Path, run_dir: pathlib.Path) -> dict:
    trainer = Trainer(cfg, run_dir, progress=False, log=lambda s: None)
    torch.set_num_threads(1)
    curve, gains, t0 = [], [], time.perf_counter()
    try:
        while trainer.step < cfg.steps:
            rec = trainer.train_step()
            if trainer.step % cfg.eval_every == 0 or trainer.step == cfg.steps:
                rec.update(trainer.evaluate())
                curve.append({"step": trainer.step, "val_loss": rec["val_loss"]})
                if cfg.model.hc_mode != "residual":
                    g = gain_of(trainer, pathlib.Path(cfg.data))
                    gains.append({"step": trainer.step, "max_composite": g["max_composite"],
                                  "max_single": g["max_single"]})
                print(f"  step {trainer.step}: train {rec['loss']:.4f} val {rec['val_loss']:.4f}", flush=True)
            if not math.isfinite(rec["loss"]):
                break
            trainer.metrics.write({k: v for k, v in rec.items() if k not in ("expert_load",)})
        seconds = time.perf_counter() - t0
        flops = train_flops_per_token(cfg.model, cfg.seq_len, mtp=cfg.mtp_weight > 0)
        result = {
            "name": name, "seed": cfg.seed, "lr": cfg.lr, "optimizer": cfg.optimizer, "hc_mode": cfg.model.hc_mode,
            "compress_ratios": list(cfg.model.compress_ratios), "sliding_window": cfg.model.sliding_window,
            "steps": trainer.step, "tokens": trainer.tokens, "seconds": seconds,
            "train_flops_per_token": flops["total"], "train_flops_per_step": flops["total"] * ROWS * SEQ,
            "val_loss": trainer.last_eval["val_loss"], "heldout_loss": heldout_loss(trainer, data / "heldout"),
            "final_train_loss": rec["loss"], "curve": curve, "gain_trace": gains,
            "gain": gain_of(trainer, pathlib.Path(cfg.data)) if cfg.model.hc_mode != "residual" else None,
            "config": cfg.to_dict(), "torch": torch.__version__,
        }
    finally:
        trainer.close()
    (run_dir / "result.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"  done in {result['seconds']:.0f}s: val {result['val_loss']:.4f}, held-out {result['heldout_loss']:.4f}",
          flush=True)
    return result


# ----------------------------------------------------------------------------- studies
def tuned_lrs(data: pathlib.Path, out: pathlib.Path) -> dict:
    """Best lr per optimizer on seed 0 by validation loss; extends the grid past an edge optimum.
    A `tuned_lr.json` already in `out` (a finished sweep, or one copied from another study) is used as is."""
    if (out / "tuned_lr.json").exists():
        return json.loads((out / "tuned_lr.json").read_text())
    best = {}
    for opt in ("muon", "adamw"):
        grid = list(LR_GRID)
        while True:
            losses = {}
            for lr in grid:
                cfg = variant_config("adamw" if opt == "adamw" else "v4", 0, {"muon": lr, "adamw": lr}, data)
                losses[lr] = run_one(run_name("adamw" if opt == "adamw" else "v4", 0, lr), cfg, data, out)["val_loss"]
            lr = min(losses, key=lambda k: losses[k] if math.isfinite(losses[k]) else math.inf)
            if lr == grid[0] and len(grid) < 6:
                grid.insert(0, round(grid[0] / math.sqrt(10), 8))
            elif lr == grid[-1] and len(grid) < 6:
                grid.append(round(grid[-1] * math.sqrt(10), 8))
            else:
                break
        best[opt] = lr
    (out / "tuned_lr.json").write_text(json.dumps(best))
    return best


def run_name(variant: str, seed: int, lr: float) -> str:
    return f"{variant}_lr{lr:g}_s{seed}"


def run_studies(studies: list[str], data: pathlib.Path, out: pathlib.Path, seeds=SEEDS) -> None:
    """Seed by seed (so that an interrupted session still has every variant at the first seeds)."""
    lrs = tuned_lrs(data, out)
    for seed in seeds:
        for variant in dict.fromkeys(v for s in studies for v in STUDIES[s]):
            cfg = variant_config(variant, seed, lrs, data)
            run_one(run_name(variant, seed, cfg.lr), cfg, data, out)


def main(argv=None) -> int:
    global STEPS, EVAL_EVERY, LOCK
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("study", choices=["lr", *STUDIES, "all"])
    p.add_argument("--out", type=pathlib.Path, default=RESULTS)
    p.add_argument("--steps", type=int, default=None,
                   help="override the step count (120): a longer check, or a smoke check")
    p.add_argument("--no-lock", action="store_true", help="do not take /tmp/dsv4-cpu.lock around each run")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated seeds (default 0,1,2)")
    args = p.parse_args(argv)
    if args.no_lock:
        LOCK = ""
    if args.steps:
        STEPS, EVAL_EVERY = args.steps, max(1, args.steps // 3)
    args.out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(args.out)
    if args.study == "lr":
        print(json.dumps(tuned_lrs(data, args.out)))
    if args.study != "lr":
        run_studies(list(STUDIES) if args.study == "all" else [args.study], data, args.out,
                    [int(x) for x in args.seeds.split(",")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
