#!/usr/bin/env bash
# Thirteenth round on one GPU: the decode graph's concurrent branches (dsv4/streams.py) and the FP8 GEMV's
# weight sub-tiles sharing x (RSUB, dsv4/kernels/fp8_gemm.py), per kernel and in the V4-Flash-shaped model,
# plus their GPU tests. Every log goes into one archive, $OUT/round13_logs.tgz (a device call brings back at
# most 8 files), written after each step, and a summary to stdout.
#   OUT=... bash bench/gpu_round13.sh [steps...]    steps: tests probe8 probe4 flash step gen
OUT=${OUT:-out_round13}
LOGS=$(mktemp -d)
steps=${*:-tests probe8 flash}
V='[{"BN":4,"BK":2048,"num_warps":4,"num_stages":2,"RSUB":2},{"BN":4,"BK":4096,"num_warps":4,"num_stages":2,"RSUB":4},
{"BN":8,"BK":2048,"num_warps":4,"num_stages":2,"RSUB":4},{"BN":16,"BK":1024,"num_warps":4,"num_stages":2,"RSUB":4},
{"BN":32,"BK":512,"num_warps":4,"num_stages":2,"RSUB":4},{"BN":32,"BK":256,"num_warps":4,"num_stages":2,"RSUB":2},
{"BN":8,"BK":1024,"num_warps":4,"num_stages":2,"RSUB":2},{"BN":2,"BK":4096,"num_warps":4,"num_stages":2,"RSUB":2},
{"BN":16,"BK":512,"num_warps":4,"num_stages":2,"RSUB":2},{"BN":8,"BK":1024,"num_warps":4,"num_stages":3,"RSUB":4},
{"BN":8,"BK":512,"num_warps":2,"num_stages":2,"RSUB":4}]'
for s in $steps; do case $s in
  tests) timeout 150 python -m pytest -q tests/test_quant.py -k "fp8 or fp4" -p no:warnings > "$LOGS/tests_quant.log" 2>&1
         timeout 100 python -m pytest -q tests/test_kernels.py -k "compressor or index_topk or select or twins" \
           -p no:warnings > "$LOGS/tests_kernels.log" 2>&1
         timeout 150 python -m pytest -q tests/test_model.py -k "concurrent or new_prompt or cache or decode" \
           -p no:warnings > "$LOGS/tests_model.log" 2>&1 ;;
  probe8) timeout 240 python bench/probe_fp8_gemv.py --rows 1 --shapes wq_a,wq_b,wo_b,shared.w1 --variants "$V" \
           --out "$LOGS/probe_fp8.json" > "$LOGS/probe_fp8.log" 2>&1 ;;
  flash) mkdir -p /tmp/flash6; timeout 330 python bench/bench_flash_shaped.py --only model --layers 6 --slope-from 2 \
           --decode-steps 16 --stream-modes on,off --fp8-rsub ${RSUB:-2} --dir /tmp/flash6 \
           --trace "$LOGS/trace6" --out "$LOGS/flash6.json" > "$LOGS/flash6.log" 2>&1 ;;
  probe4) timeout 200 python bench/probe_flash_decode.py --only fp4 --batches 1 --out "$LOGS/probe_fp4.json" \
           > "$LOGS/probe_fp4.log" 2>&1 ;;
  quick) timeout 90 python -m pytest -q tests/test_kernels.py -k "merges_the_derotation or index_topk_decode or \
           model_with_the_kernels or training_step" -p no:warnings > "$LOGS/tests_quick.log" 2>&1
         timeout 60 python -m pytest -q tests/test_model.py -k "concurrent" -p no:warnings >> "$LOGS/tests_quick.log" 2>&1 ;;
  flash1) mkdir -p /tmp/flash6; timeout 200 python bench/bench_flash_shaped.py --only model --layers 6 --slope-from 2 \
           --decode-steps 16 --dir /tmp/flash6 --out "$LOGS/flash6.json" > "$LOGS/flash6.log" 2>&1 ;;
  step) timeout 120 python bench/probe_compressor_step.py --out "$LOGS/probe_step.json" > "$LOGS/probe_step.log" 2>&1 ;;
  gen) python bench/bench_generate.py --device cuda --batch 1 --prompt-lens 4096,16384 --decode-tokens 32 --peer \
         --decode-modes graph --no-engine --repeats 3 --out "$LOGS/gen.json" > "$LOGS/gen.log" 2>&1 ;;
esac
  mkdir -p "$OUT"; tar czf "$OUT/round13_logs.tgz" -C "$LOGS" .      # after each step: a cut-off call keeps the rest
done
tail -n 3 "$LOGS"/tests_*.log 2>/dev/null
grep -h "gemv\|tiled" "$LOGS/probe_fp8.log" 2>/dev/null | cut -c1-130 | head -60
grep -h "^decode" "$LOGS"/flash*6.log 2>/dev/null | cut -c1-250
grep -h "^{" "$LOGS/probe_step.log" 2>/dev/null
grep -h "^fp4" "$LOGS/probe_fp4.log" 2>/dev/null | cut -c1-170
tail -n 4 "$LOGS/gen.log" 2>/dev/null
