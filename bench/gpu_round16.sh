#!/usr/bin/env bash
# Sixteenth round on one GPU: the quantised decode GEMVs' K loop double-buffered in registers (FP4 expert
# words kernels: fp4_moe.WORDS_PIPE, the row max in one block: WORDS_AMAX_BLOCK; FP8 GEMV: fp8_gemm.GEMV_PIPE),
# each kernel on its own from HBM (probe_flash_decode.py --only fp4loop, probe_fp8_gemv.py with PIPE variants),
# then the V4-Flash-shaped model's decode under named module settings (bench_flash_shaped.py --settings; the
# fifteenth round's untimed settings too), a recorded decode timeline, and the GPU tests. Every log goes into
# one archive, $OUT/round16_logs.tgz, written after each step, and a summary to stdout.
#   OUT=... bash bench/gpu_round16.sh [steps...]    steps: tests probe probe8 flash trace gen
# Model settings in $SETTINGS (default below); extra bench_flash_shaped.py arguments in $FLASH_ARGS.
# `probe` (FP4) with `probe8` (FP8) fill one device call, `flash` another, `tests` a third.
OUT=${OUT:-out_round16}
F4=dsv4.kernels.fp4_moe
F8=dsv4.kernels.fp8_gemm
T32="$F4.TILES={'gemv':{'BN':4,'BK':512,'num_warps':4,'num_stages':2},'words':{'BN':32,'BK':256,'num_warps':4,'num_stages':2},'words_pair_down':{'BN':32,'BK':256,'num_warps':4,'num_stages':2}}"
SETTINGS=${SETTINGS-"base:;f4pipe:$F4.WORDS_PIPE=True,$F4.WORDS_AMAX_BLOCK=4096;f4amax:$F4.WORDS_AMAX_BLOCK=4096;f4pipe32:$F4.WORDS_PIPE=True,$F4.WORDS_AMAX_BLOCK=4096,$T32;f8pipe:$F8.GEMV_PIPE=True;pipes:$F4.WORDS_PIPE=True,$F4.WORDS_AMAX_BLOCK=4096,$F8.GEMV_PIPE=True;postpre:dsv4.model.FUSE_POST_PRE=True;defer:dsv4.ops.HC_DEFER_TOKENS=15"}
FP8_VARIANTS='[{"BN":32,"BK":256,"num_warps":4,"num_stages":2,"RSUB":2,"PIPE":true},{"BN":4,"BK":2048,"num_warps":4,"num_stages":2,"RSUB":2,"PIPE":true},{"BN":8,"BK":1024,"num_warps":4,"num_stages":2,"RSUB":2,"PIPE":true},{"BN":16,"BK":512,"num_warps":4,"num_stages":2,"RSUB":2,"PIPE":true},{"BN":8,"BK":512,"num_warps":2,"num_stages":2,"RSUB":4,"PIPE":true}]'
LOGS=$(mktemp -d)
steps=${*:-probe probe8}
flash() {   # name, then bench_flash_shaped.py arguments
  local name=$1; shift; mkdir -p /tmp/flash6
  timeout 480 python bench/bench_flash_shaped.py --only model --layers 6 --slope-from 2 --decode-steps 16 \
    --dir /tmp/flash6 --out "$LOGS/$name.json" "$@" $FLASH_ARGS > "$LOGS/$name.log" 2>&1
}
for s in $steps; do case $s in
  tests) timeout 240 python -m pytest -q tests/test_quant.py -k "fp4 or fp8" -p no:warnings > "$LOGS/tests_quant.log" 2>&1
         timeout 200 python -m pytest -q tests/test_kernels.py -k "sparse_attention or split_attention or \
           model_with_the_kernels or hc_ or sinkhorn" -p no:warnings > "$LOGS/tests_kernels.log" 2>&1 ;;
  probe) timeout 330 python bench/probe_flash_decode.py --only fp4loop --batches 1,2 --out "$LOGS/probe_fp4_loop.json" \
           > "$LOGS/probe_fp4_loop.log" 2>&1 ;;
  probe8) timeout 240 python bench/probe_fp8_gemv.py --rows 1,2 --variants "$FP8_VARIANTS" \
            --out "$LOGS/probe_fp8_pipe.json" > "$LOGS/probe_fp8_pipe.log" 2>&1 ;;
  flash) flash flash6 ${SETTINGS:+--settings "$SETTINGS"} ;;
  trace) flash flash_trace --batches 1 --trace "$LOGS/trace6" ;;
  gen) timeout 300 python bench/bench_generate.py --device cuda --batch 1 --prompt-lens 4096,16384 --decode-tokens 32 \
         --peer --decode-modes graph --no-engine --repeats 3 --out "$LOGS/gen.json" > "$LOGS/gen.log" 2>&1 ;;
esac
  mkdir -p "$OUT"; tar czf "$OUT/round16_logs.tgz" -C "$LOGS" .      # after each step: a cut-off call keeps the rest
done
tail -n 3 "$LOGS"/tests_*.log 2>/dev/null
grep -h "^fp4 experts" "$LOGS/probe_fp4_loop.log" 2>/dev/null | cut -c1-220
grep -hE "gemv|tiled" "$LOGS/probe_fp8_pipe.log" 2>/dev/null | tail -n 40 | cut -c1-200
grep -h "^decode" "$LOGS"/flash*.log 2>/dev/null | cut -c1-260
tail -n 4 "$LOGS/gen.log" 2>/dev/null
