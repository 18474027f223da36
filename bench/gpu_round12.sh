#!/usr/bin/env bash
# Twelfth round on one GPU: the FP4 expert GEMVs in packed fp16 arithmetic (dsv4/kernels/half2.py) against
# their fp32 arithmetic, per kernel and in the V4-Flash-shaped model, plus the GPU tests of the kernels and
# cached paths. Every log goes into one archive, $OUT/round12_logs.tgz (a device call brings back at most
# 8 files), written after each step, and a summary to stdout.
#   OUT=... bash bench/gpu_round12.sh [steps...]    steps: tests probe flash gen launch
OUT=${OUT:-out_round12}
LOGS=$(mktemp -d)
steps=${*:-tests probe flash}
for s in $steps; do case $s in
  tests) timeout 150 python -m pytest -q tests/test_quant.py -k "fp4 or fp8" -p no:warnings > "$LOGS/tests_quant.log" 2>&1
         timeout 120 python -m pytest -q tests/test_kernels.py -k "hc or launch" -p no:warnings > "$LOGS/tests_kernels.log" 2>&1
         timeout 120 python -m pytest -q tests/test_model.py -k "new_prompt or cache or decode or bad_inputs or reads_the_device" \
           -p no:warnings > "$LOGS/tests_model.log" 2>&1 ;;
  probe) timeout 200 python bench/probe_flash_decode.py --only fp4 --batches 1,2 --out "$LOGS/probe_fp4.json" \
           > "$LOGS/probe_fp4.log" 2>&1 ;;
  flash) mkdir -p /tmp/flash6; timeout 300 python bench/bench_flash_shaped.py --only model --layers 6 --slope-from 2 \
           --decode-steps 16 --fp4-decode-kernels words,words32 --dir /tmp/flash6 --profile "$LOGS/flash_prof6.txt" \
           --out "$LOGS/flash6.json" > "$LOGS/flash6.log" 2>&1 ;;
  gen) python bench/bench_generate.py --device cuda --batch 1 --prompt-lens 4096,16384 --decode-tokens 32 --peer \
         --decode-modes graph --no-engine --repeats 3 --out "$LOGS/gen.json" > "$LOGS/gen.log" 2>&1 ;;
  launch) python bench/probe_launch.py --out "$LOGS/probe_launch.json" > "$LOGS/probe_launch.log" 2>&1 ;;
esac
  mkdir -p "$OUT"; tar czf "$OUT/round12_logs.tgz" -C "$LOGS" .      # after each step: a cut-off call keeps the rest
done
tail -n 3 "$LOGS"/tests_*.log 2>/dev/null
grep -h "^fp4 experts" "$LOGS/probe_fp4.log" 2>/dev/null | cut -c1-150
grep -h "^decode" "$LOGS/flash6.log" 2>/dev/null | cut -c1-260
tail -n 4 "$LOGS/gen.log" "$LOGS/probe_launch.log" 2>/dev/null
