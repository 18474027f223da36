#!/usr/bin/env bash
# Fifteenth round on one GPU: the decode step's split attention (bench/probe_decode_attn.py: launch
# variants of the split forward and of its merge), the V4-Flash-shaped model's decode under named
# module settings (bench_flash_shaped.py --settings), a recorded decode timeline, the bench preset against
# transformers, plus the GPU tests. Every log goes into one archive, $OUT/round15_logs.tgz (a device call
# brings back at most 8 files), written after each step, and a summary to stdout.
#   OUT=... bash bench/gpu_round15.sh [steps...]    steps: tests probe flash trace gen
# Model settings for the flash step in $SETTINGS (bench_flash_shaped.py --settings; default: the defaults,
# then mHC's deferred Sinkhorn on, every mHC boundary's hc_post with the next site's mix, both,
# the MoE's shared add as a separate launch again, the split attention's merge over 2 heads × 256
# columns, 32 heads a split program); extra arguments for bench_flash_shaped.py in $FLASH_ARGS (flash and
# trace steps).
# The steps' time limits add up past one device call: run `flash` and `tests` in separate calls.
OUT=${OUT:-out_round15}
SA=dsv4.kernels.sparse_attention
SETTINGS=${SETTINGS-"base:;defer:dsv4.ops.HC_DEFER_TOKENS=15;postpre:dsv4.model.FUSE_POST_PRE=True;both:dsv4.ops.HC_DEFER_TOKENS=15,dsv4.model.FUSE_POST_PRE=True;noadd:dsv4.model.FUSE_SHARED_ADD=False;m2:$SA.MERGE=(2,256);h32:$SA.SPLIT_BLOCK_H=32"}
LOGS=$(mktemp -d)
steps=${*:-tests flash}
flash() {   # name, then bench_flash_shaped.py arguments
  local name=$1; shift; mkdir -p /tmp/flash6
  timeout 420 python bench/bench_flash_shaped.py --only model --layers 6 --slope-from 2 --decode-steps 16 \
    --dir /tmp/flash6 --out "$LOGS/$name.json" "$@" $FLASH_ARGS > "$LOGS/$name.log" 2>&1
}
for s in $steps; do case $s in
  tests) timeout 200 python -m pytest -q tests/test_kernels.py -k "sparse_attention or split_attention or \
           model_with_the_kernels or hc_ or sinkhorn" -p no:warnings > "$LOGS/tests_kernels.log" 2>&1
         timeout 120 python -m pytest -q tests/test_model.py -k "concurrent or cache or decode or joins" \
           -p no:warnings > "$LOGS/tests_model.log" 2>&1 ;;
  probe) timeout 300 python bench/probe_decode_attn.py --out "$LOGS/probe_decode_attn.json" \
           > "$LOGS/probe_decode_attn.log" 2>&1 ;;
  flash) flash flash6 ${SETTINGS:+--settings "$SETTINGS"} ;;
  trace) flash flash_trace --batches 1 --trace "$LOGS/trace6" ;;
  gen) timeout 300 python bench/bench_generate.py --device cuda --batch 1 --prompt-lens 4096,16384 --decode-tokens 32 \
         --peer --decode-modes graph --no-engine --repeats 3 --out "$LOGS/gen.json" > "$LOGS/gen.log" 2>&1 ;;
esac
  mkdir -p "$OUT"; tar czf "$OUT/round15_logs.tgz" -C "$LOGS" .      # after each step: a cut-off call keeps the rest
done
tail -n 3 "$LOGS"/tests_*.log 2>/dev/null
grep -h "^best" "$LOGS/probe_decode_attn.log" 2>/dev/null | cut -c1-200
grep -h "^decode" "$LOGS"/flash*.log 2>/dev/null | cut -c1-260
tail -n 4 "$LOGS/gen.log" 2>/dev/null
