#!/usr/bin/env bash
# Fourteenth round on one GPU: the PDL trigger before the wait in a chain of small kernels
# (bench/probe_pdl.py), the V4-Flash-shaped model's decode (streams on and off), a recorded decode
# timeline, plus the GPU tests. (The round's model-level variants, the trigger before the wait, weight
# chunks loaded before it and the mHC Sinkhorn on the second stream, were measured with this script's
# steps on trees that had them and removed afterwards: bench/results/README.md.) Every log goes into one archive, $OUT/round14_logs.tgz (a
# device call brings back at most 8 files), written after each step, and a summary to stdout.
#   OUT=... bash bench/gpu_round14.sh [steps...]    steps: tests tests2 pdl flash trace gen
# (tests2: the kernel and model tests of tests, without the FP8/FP4 ones)
# Extra arguments for bench_flash_shaped.py in $FLASH_ARGS (the flash and trace steps).
OUT=${OUT:-out_round14}
LOGS=$(mktemp -d)
steps=${*:-tests flash}
flash() {   # name, then bench_flash_shaped.py arguments
  local name=$1; shift; mkdir -p /tmp/flash6
  timeout 330 python bench/bench_flash_shaped.py --only model --layers 6 --slope-from 2 --decode-steps 16 \
    --dir /tmp/flash6 --out "$LOGS/$name.json" "$@" $FLASH_ARGS > "$LOGS/$name.log" 2>&1
}
for s in $steps; do case $s in
  tests) timeout 150 python -m pytest -q tests/test_quant.py -k "fp8 or fp4" -p no:warnings > "$LOGS/tests_quant.log" 2>&1
         ;&
  tests2) timeout 200 python -m pytest -q tests/test_kernels.py -k "merges_the_derotation or index_topk or \
           model_with_the_kernels or training_step or waits_for or hc_ or sinkhorn" -p no:warnings \
           > "$LOGS/tests_kernels.log" 2>&1
         timeout 120 python -m pytest -q tests/test_model.py -k "concurrent or cache or decode or joins" \
           -p no:warnings > "$LOGS/tests_model.log" 2>&1 ;;
  pdl) timeout 120 python bench/probe_pdl.py --layers 4 --out "$LOGS/probe_pdl.json" > "$LOGS/probe_pdl.log" 2>&1 ;;
  flash) flash flash6 --stream-modes on,off ;;
  trace) flash flash_trace --batches 1 --trace "$LOGS/trace6" ;;
  gen) timeout 300 python bench/bench_generate.py --device cuda --batch 1 --prompt-lens 4096,16384 --decode-tokens 32 \
         --peer --decode-modes graph --no-engine --repeats 3 --out "$LOGS/gen.json" > "$LOGS/gen.log" 2>&1 ;;
esac
  mkdir -p "$OUT"; tar czf "$OUT/round14_logs.tgz" -C "$LOGS" .      # after each step: a cut-off call keeps the rest
done
tail -n 3 "$LOGS"/tests_*.log 2>/dev/null
grep -h "^{" "$LOGS/probe_pdl.log" 2>/dev/null | cut -c1-200
grep -h "^decode" "$LOGS"/flash*.log 2>/dev/null | cut -c1-230
tail -n 4 "$LOGS/gen.log" 2>/dev/null
