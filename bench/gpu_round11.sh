#!/usr/bin/env bash
# Eleventh round on one GPU: host cost of the eager paths (launch cache, new-prompt compressor update)
# against the tree in .base/ (an earlier commit's dsv4/ and bench/, when present), then the peers, then
# the GPU tests. Every log goes into one archive, $OUT/round11_logs.tgz (a device call brings back at
# most 8 files), and the summary to stdout. Each step takes 0.5-4 minutes: keep a call's steps within
# its time limit.
#   OUT=... bash bench/gpu_round11.sh [steps...]    steps: ab train decode gen trainpeer tests flash launch
OUT=${OUT:-out_round11}
LOGS=$(mktemp -d)
steps=${*:-ab train decode gen trainpeer tests}
pa() { python bench/prefill_anatomy.py --length 4096 "$@"; }
for s in $steps; do case $s in
  ab) for i in 1 2; do
        [ -d .base ] && (cd .base && python bench/prefill_anatomy.py --length 4096 > "$LOGS/pa_base_$i.log" 2>&1)
        DSV4_FAST_LAUNCH=0 pa > "$LOGS/pa_nocache_$i.log" 2>&1
        pa --out "$LOGS/pa_new_$i.json" > "$LOGS/pa_new_$i.log" 2>&1
      done ;;
  train) [ -d .base ] && (cd .base && python bench/prefill_anatomy.py --length 4096 --train > "$LOGS/ta_base.log" 2>&1)
         DSV4_FAST_LAUNCH=0 pa --train > "$LOGS/ta_nocache.log" 2>&1
         pa --train --out "$LOGS/ta_new.json" > "$LOGS/ta_new.log" 2>&1 ;;
  decode) DSV4_FAST_LAUNCH=0 pa --decode > "$LOGS/da_nocache.log" 2>&1
          pa --decode > "$LOGS/da_new.log" 2>&1 ;;
  launch) python bench/probe_launch.py --out "$LOGS/probe_launch.json" > "$LOGS/probe_launch.log" 2>&1 ;;
  gen) python bench/bench_generate.py --device cuda --batch 1 --prompt-lens 4096,16384 --decode-tokens 32 --peer \
         --decode-modes graph --no-engine --repeats 3 --out "$LOGS/gen.json" > "$LOGS/gen.log" 2>&1 ;;
  trainpeer) python bench/bench_train.py --peer --graph --iters 8 --out "$LOGS/train.json" > "$LOGS/train.log" 2>&1 ;;
  tests) timeout 220 python -m pytest -q -x tests/test_kernels.py -p no:warnings > "$LOGS/tests_kernels.log" 2>&1
         timeout 100 python -m pytest -q -x tests/test_model.py -k "new_prompt or plan or cache or decode or chunked" \
           -p no:warnings > "$LOGS/tests_model.log" 2>&1 ;;
  flash) mkdir -p /tmp/flash6; python bench/bench_flash_shaped.py --only model --layers 6 --slope-from 2 \
           --decode-steps 16 --dir /tmp/flash6 --out "$LOGS/flash6.json" > "$LOGS/flash6.log" 2>&1 ;;
esac
  mkdir -p "$OUT"; tar czf "$OUT/round11_logs.tgz" -C "$LOGS" .      # after each step: a cut-off call keeps the rest
done
for f in "$LOGS"/*a_*.log; do [ -e "$f" ] && echo "$(basename "$f"): $(grep -h '^==' "$f" | cut -c1-230)"; done
tail -n 4 "$LOGS/gen.log" "$LOGS/train.log" "$LOGS/flash6.log" "$LOGS/probe_launch.log" 2>/dev/null
tail -n 2 "$LOGS"/tests_*.log 2>/dev/null
