#!/usr/bin/env bash
# One device call: the kernel tests on CUDA, kernel benchmarks, end-to-end prefill/decode/training
# against transformers, and profiles. Writes everything under $OUT (default ./gpu_out).
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
step() { local name=$1 limit=$2; shift 2; echo "== $name"; local t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$? $(( $(date +%s) - t0 ))s"; tail -n "${TAIL:-15}" "$OUT/$name.log"; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.used --format=csv,noheader
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
case "${1:-all}" in
  all|tests) TAIL=6 step tests 240 python3 -m pytest tests/test_kernels.py -x -q -p no:cacheprovider ;;&
  all|kernels) TAIL=25 step kernels 300 python3 bench/bench_kernels.py --out "$OUT/kernels.json" ;;&
  all|e2e) TAIL=20 step generate 400 python3 bench/bench_generate.py --device cuda --batch 1 --prompt-lens 4096,16384 \
      --decode-tokens 32 --peer --decode-modes graph --no-engine --repeats 2 --out "$OUT/generate.json" ;;&
  all|long) TAIL=12 step long 400 python3 bench/bench_long_prefill.py --lengths 65536,262144,1048576 --budget-s 120 \
      --out "$OUT/long_prefill.json" ;;&
  all|train) TAIL=20 step train 300 python3 bench/bench_train.py --peer --graph --out "$OUT/train.json" ;;&
  all|prof) TAIL=80 step profile 300 python3 bench/profile_steps.py --prefill 4096 --train 4096 --out-dir "$OUT/prof" ;;
esac
