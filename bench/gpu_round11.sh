#!/usr/bin/env bash
# Eleventh round on one GPU: host cost of the eager paths (launch cache, new-prompt compressor update)
# against the tree in .base/ (the previous commit's dsv4/ and bench/, when present), then the peers,
# then the GPU tests. Logs go to $OUT (default ./out_round11).
#   bash bench/gpu_round11.sh [steps...]    steps: ab train decode gen trainpeer tests flash
OUT=${OUT:-out_round11}; mkdir -p "$OUT"
steps=${*:-ab train decode gen trainpeer tests}
pa() { python bench/prefill_anatomy.py --length 4096 "$@"; }
for s in $steps; do case $s in
  ab) for i in 1 2; do
        [ -d .base ] && (cd .base && python bench/prefill_anatomy.py --length 4096 > "$OUT/pa_base_$i.log" 2>&1)
        DSV4_FAST_LAUNCH=0 pa > "$OUT/pa_nocache_$i.log" 2>&1
        pa --out "$OUT/pa_new.json" > "$OUT/pa_new_$i.log" 2>&1
      done ;;
  train) [ -d .base ] && (cd .base && python bench/prefill_anatomy.py --length 4096 --train > "$OUT/ta_base.log" 2>&1)
         DSV4_FAST_LAUNCH=0 pa --train > "$OUT/ta_nocache.log" 2>&1
         pa --train --out "$OUT/ta_new.json" > "$OUT/ta_new.log" 2>&1 ;;
  decode) DSV4_FAST_LAUNCH=0 pa --decode > "$OUT/da_nocache.log" 2>&1
          pa --decode > "$OUT/da_new.log" 2>&1 ;;
  gen) python bench/bench_generate.py --device cuda --batch 1 --prompt-lens 4096,16384 --decode-tokens 32 --peer \
         --decode-modes graph --no-engine --repeats 3 --out "$OUT/gen.json" > "$OUT/gen.log" 2>&1 ;;
  trainpeer) python bench/bench_train.py --peer --graph --iters 8 --out "$OUT/train.json" > "$OUT/train.log" 2>&1 ;;
  tests) timeout 220 python -m pytest -q -x tests/test_kernels.py -p no:warnings > "$OUT/tests_kernels.log" 2>&1
         timeout 100 python -m pytest -q -x tests/test_model.py -k "new_prompt or plan or cache or decode or chunked" \
           -p no:warnings > "$OUT/tests_model.log" 2>&1 ;;
  flash) mkdir -p /tmp/flash6; python bench/bench_flash_shaped.py --only model --layers 6 --slope-from 2 \
           --decode-steps 16 --dir /tmp/flash6 --out "$OUT/flash6.json" > "$OUT/flash6.log" 2>&1 ;;
esac; done
for f in "$OUT"/*a_*.log; do echo "$(basename "$f"): $(grep -h '^==' "$f" | cut -c1-230)"; done
tail -n 4 "$OUT/gen.log" "$OUT/train.log" "$OUT/flash6.log" 2>/dev/null
tail -n 2 "$OUT"/tests_*.log 2>/dev/null
