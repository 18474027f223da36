#!/usr/bin/env bash
# Device calls for the quantised-resident, distributed-training, serving and context-cost benchmarks.
# Writes under $OUT; `bash bench/gpu_session_others.sh quant|dist|serving|context`.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
step() { local name=$1 limit=$2; shift 2; echo "== $name"; local t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$? $(( $(date +%s) - t0 ))s"; tail -n "${TAIL:-15}" "$OUT/$name.log"; }
case "${1:-}" in
  quant)
    TAIL=5 step quant_tests 200 python3 -m pytest tests/test_quant.py tests/test_quant_resident.py tests/test_parallel_inference.py -x -q -p no:cacheprovider
    TAIL=20 step flash_kernels 200 python3 bench/bench_flash_shaped.py --only kernels,parity --out "$OUT/flash_kernels_parity.json"
    TAIL=25 step flash_model 400 python3 bench/bench_flash_shaped.py --only model --layers "${LAYERS:-4}" --out "$OUT/flash_model.json" ;;
  dist)
    TAIL=25 step torchrun_small 400 bash bench/run_torchrun_small.sh "$OUT/torchrun_small" 20 1 ;;
  serving)
    TAIL=20 step serving 300 python3 bench/bench_serving.py --device cuda --preset bench --prompt 4096,16384 --suffix 64 \
      --out "$OUT/serving_h200.json" ;;
  context)
    TAIL=25 step context 500 python3 bench/bench_context_cost.py --graphs --check-fill --prefill-max 1048576 \
      --out "$OUT/context_cost.json" --plot "$OUT/context_cost.png" ;;
esac
