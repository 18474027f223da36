#!/usr/bin/env bash
# Device calls of the seventeenth round (one H200): the sixteenth round's loop forms of the quantised decode
# GEMVs, on their own and in the model.
#   OUT=... bash bench/gpu_round17.sh [steps...]    steps: probe tests flash trace gen
# `probe` (the FP4 word kernels' loop forms at batch 1; with the FP8 GEMV's pipelined loop and tensor-core form,
# both since removed, it ran on 2026-12-05, `bench/results/README.md`) fills one call, `flash` (the 6-layer V4-Flash-shaped model
# under each setting of $SETTINGS, timed in one process; the last two turn on the deferred Sinkhorn, which
# was on in the one call of an earlier round that never returned, so they come after everything else;
# `combo` is the untimed forms at once) another, `tests` (the quantised kernels' and the decode kernels'
# GPU tests) a third. Extra bench_flash_shaped.py arguments in $FLASH_ARGS. After each step the logs so far
# are archived in $OUT/round17_logs.tgz, so that a call cut off keeps what it finished.
set -u
OUT=${OUT:-out_round17}
F4=dsv4.kernels.fp4_moe
T32="$F4.TILES={'gemv':{'BN':4,'BK':512,'num_warps':4,'num_stages':2},'words':{'BN':32,'BK':256,'num_warps':4,'num_stages':2},'words_pair_down':{'BN':32,'BK':256,'num_warps':4,'num_stages':2}}"
SETTINGS=${SETTINGS-"base:;f4pipe:$F4.WORDS_PIPE=True;f4pipe32:$F4.WORDS_PIPE=True,$T32;postpre:dsv4.model.FUSE_POST_PRE=True;defer:dsv4.ops.HC_DEFER_TOKENS=15;combo:$F4.WORDS_PIPE=True,$T32,dsv4.model.FUSE_POST_PRE=True,dsv4.ops.HC_DEFER_TOKENS=15"}
LOGS=$(mktemp -d)
steps=${*:-probe}
flash() {   # name, then bench_flash_shaped.py arguments
  local name=$1; shift; mkdir -p /tmp/flash6
  timeout 500 python bench/bench_flash_shaped.py --only model --layers 6 --slope-from 2 --decode-steps 16 \
    --dir /tmp/flash6 --out "$LOGS/$name.json" "$@" ${FLASH_ARGS:-} > "$LOGS/$name.log" 2>&1
}
for s in $steps; do case $s in
  tests) timeout 260 python -m pytest -q tests/test_quant.py -k "fp4 or fp8" -p no:warnings > "$LOGS/tests_quant.log" 2>&1
         timeout 120 python -m pytest -q tests/test_quant_resident.py -k "triton" -p no:warnings \
           > "$LOGS/tests_resident.log" 2>&1
         timeout 200 python -m pytest -q tests/test_kernels.py -k "sparse_attention or split_attention or \
           model_with_the_kernels or hc_ or sinkhorn" -p no:warnings > "$LOGS/tests_kernels.log" 2>&1 ;;
  probe) timeout 200 python bench/probe_flash_decode.py --only fp4loop --batches 1 --out "$LOGS/probe_fp4_loop.json" \
           > "$LOGS/probe_fp4_loop.log" 2>&1 ;;
  flash) flash flash6 ${SETTINGS:+--settings "$SETTINGS"} ;;
  trace) flash flash_trace --batches 1 --trace "$LOGS/trace6" ;;
  gen) timeout 300 python bench/bench_generate.py --device cuda --batch 1 --prompt-lens 4096,16384 --decode-tokens 32 \
         --peer --decode-modes graph --no-engine --repeats 3 --out "$LOGS/gen.json" > "$LOGS/gen.log" 2>&1 ;;
  *) echo "unknown step $s (probe tests flash trace gen)"; exit 2 ;;
esac
  mkdir -p "$OUT"; tar czf "$OUT/round17_logs.tgz" -C "$LOGS" .      # after each step: a cut-off call keeps the rest
done
tail -n 3 "$LOGS"/tests_*.log 2>/dev/null
grep -h "^fp4 experts" "$LOGS/probe_fp4_loop.log" 2>/dev/null | cut -c1-220
grep -h "^decode" "$LOGS"/flash*.log 2>/dev/null | cut -c1-260
