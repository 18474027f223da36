#!/usr/bin/env bash
# One device call, steps in priority order under one deadline (DEADLINE seconds from the start, default
# 560): the 1-process NCCL training run, decode cost from 4K to 1M, prefill/decode and training against
# transformers, the kernel tests on CUDA, the V4-Flash-shaped quantised model. Logs and JSON go to a
# scratch folder that is packed into $OUT/results.tgz whatever happens (a trap), so a step cut short
# still returns what it wrote.   bash bench/gpu_session_final.sh [steps...]   (default: all, in order)
set -u
OUT=${OUT:-gpu_out}
RES=${RES:-/tmp/dsv4_results}
mkdir -p "$OUT" "$RES"
export PYTHONPATH=$PWD
T0=$(date +%s)
DEADLINE=${DEADLINE:-560}
trap 'tar -czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null' EXIT
step() { local name=$1 limit=$2; shift 2
  local left=$(( DEADLINE - ($(date +%s) - T0) )); [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then echo "== $name skipped (no time left)"; return; fi
  echo "== $name (limit ${limit}s)"; local t=$(date +%s)
  timeout "$limit" "$@" > "$RES/$name.log" 2>&1; echo "rc=$? $(( $(date +%s) - t ))s"; tail -n "${TAIL:-15}" "$RES/$name.log"; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.used --format=csv,noheader
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
for s in ${@:-dist context e2e train tests flash}; do case $s in
  dist) TAIL=30 step dist 130 bash bench/run_torchrun_small.sh "$RES/torchrun_small" 12 1 ;;
  context) TAIL=20 step context 160 python3 bench/bench_context_cost.py --graphs --check-fill --prefill-max 65536 \
      --steps 16 --out "$RES/context_cost.json" --plot "$RES/context_cost.png" ;;
  e2e) TAIL=20 step generate 170 python3 bench/bench_generate.py --device cuda --batch 1 --prompt-lens 4096,16384 \
      --decode-tokens 32 --peer --decode-modes graph --no-engine --repeats 2 --out "$RES/generate.json" ;;
  train) TAIL=20 step train 130 python3 bench/bench_train.py --peer --graph --out "$RES/train.json" ;;
  trainq) TAIL=20 step trainq 70 python3 bench/bench_train.py --graph --out "$RES/train_q.json" ;;
  train1b) TAIL=20 step train1b 90 python3 bench/bench_train.py --preset bench-1b --graph --iters 3 --out "$RES/train_1b.json" ;;
  prof1b) TAIL=40 step prof1b 120 python3 bench/profile_steps.py --preset bench-1b --prefill 0 --train 4096 \
      --out-dir "$RES/prof1b" ;;
  proftrain) TAIL=40 step proftrain 90 python3 bench/profile_steps.py --prefill 0 --train 4096 --out-dir "$RES/proftrain" ;;
  train1b16k) TAIL=20 step train1b16k 120 python3 bench/bench_train.py --preset bench-1b --batch 4 --graph --iters 3 \
      --out "$RES/train_1b_16k.json" ;;
  kcomp) TAIL=6 step kcomp 60 python3 -m pytest tests/test_kernels.py -x -q -p no:cacheprovider -k "compressor" ;;
  profdec) TAIL=30 step profdec 60 python3 bench/profile_steps.py --prefill 0 --decode 4096 --train 0 \
      --out-dir "$RES/profdec" ;;
  gemv) TAIL=120 step gemv 90 python3 bench/probe_gemv.py --out "$RES/probe_gemv.json" ;;
  kfast) TAIL=6 step kfast 120 python3 -m pytest tests/test_kernels.py -x -q -p no:cacheprovider \
      -k "gemv or dense or router or pooling or rows_at or compressor or training_step or model_with" ;;
  diag) TAIL=12 step diag 60 python3 bench/diag_route.py
      for o in route; do DSV4_OPS=$o=torch TAIL=3 step "model_$o=torch" 60 python3 -m pytest tests/test_kernels.py -x -q \
        -p no:cacheprovider -k model_with; done ;;
  kmodel) TAIL=6 step kmodel 90 python3 -m pytest tests/test_kernels.py -x -q -p no:cacheprovider -k "model_with or router" ;;
  diagm) TAIL=8 step diagm 120 python3 bench/diag_model.py primitives ;;
  diagt) TAIL=8 step diagt 90 python3 bench/diag_model.py ties ;;
  diagr) TAIL=12 step diagr 60 python3 bench/diag_model.py repeat ;;
  diagv) TAIL=16 step diagv 60 python3 bench/diag_model.py diverge ;;
  diagd) TAIL=30 CUBLAS_WORKSPACE_CONFIG=:4096:8 step diagd 60 python3 bench/diag_model.py repeat --deterministic ;;
  knew) TAIL=6 step knew 50 python3 -m pytest tests/test_kernels.py -x -q -p no:cacheprovider \
      -k "radix or long_rows or topk or norm_rope or training_step or model_with" ;;
  e2e4k) TAIL=20 step generate 130 python3 bench/bench_generate.py --device cuda --batch 1 --prompt-lens 4096,16384 \
      --decode-tokens 32 --peer --decode-modes graph --no-engine --repeats 1 --out "$RES/generate.json" ;;
  tests) TAIL=8 step tests 150 python3 -m pytest tests/test_kernels.py -x -q -p no:cacheprovider ;;
  kfp8) TAIL=6 step kfp8 90 python3 -m pytest tests/test_kernels.py tests/test_model.py tests/test_engine.py -q \
      -p no:cacheprovider -k "fp8 or e4m3 or kv8" ;;
  e2ekv) TAIL=12 step generate_kv 150 python3 bench/bench_generate.py --device cuda --batch 1,8 \
      --prompt-lens 4096,65536 --decode-tokens 32 --decode-modes graph --no-engine --kv-cache both \
      --out "$RES/generate_kv.json" ;;
  khc) TAIL=6 step khc 120 python3 -m pytest tests/test_kernels.py tests/test_moe_ops.py -q -p no:cacheprovider \
      -k "hc_ or training_step or swiglu or sparse_attention or fast_paths or twice or key_lists or model_with" ;;
  khc2) TAIL=12 step khc2 150 python3 -m pytest tests/test_kernels.py tests/test_moe_ops.py -q -p no:cacheprovider -x \
      -k "swiglu_gradients or hc_pre_backward_bf16x3 or hc_mix or fused_hc or hc_pre_gradients or fast_paths or twice or not_read or model_with_the" ;;
  hc1b) TAIL=20 step hc1b 90 python3 bench/bench_kernels.py --only hc1b --out "$RES/kernels_hc1b.json" ;;
  kquick) TAIL=6 step kquick 60 python3 -m pytest tests/test_kernels.py -x -q -p no:cacheprovider \
      -k "hc_pre or sparse or norm_rope or expert_gemv" ;;
  krest) TAIL=12 step krest 170 python3 -m pytest tests/test_kernels.py tests/test_quant.py -q -p no:cacheprovider \
      -k "not model_with_the_kernels" ;;
  ktests) TAIL=6 step ktests 150 python3 -m pytest tests/test_kernels.py tests/test_quant.py -x -q -p no:cacheprovider ;;
  probe) TAIL=30 step probe 70 python3 bench/probe_quant_kernels.py --out "$RES/probe_quant.json" ;;
  flashmodel) BEST=$(python3 -c "import json,sys; b=json.load(open('$RES/probe_quant.json'))['best_gemv']; print(json.dumps(b) if b else '')" 2>/dev/null)
      TAIL=12 step flashmodel 70 python3 bench/bench_flash_shaped.py --only model --layers 2 --batches 1,32 \
      --decode-steps 16 ${BEST:+--fp4-gemv-tiles "$BEST"} --profile "$RES/prof/flash_decode.txt" \
      --out "$RES/flash_model.json" ;;
  prof) TAIL=45 step profile 120 python3 bench/profile_steps.py --prefill 4096 --train 4096 --out-dir "$RES/prof" ;;
  anatomy) TAIL=12 step anatomy 120 python3 bench/profile_steps.py --prefill 4096 --decode 4096 --train 4096 \
      --out-dir "$RES/prof" ;;
  attn) TAIL=12 step attn 90 python3 bench/bench_kernels.py --only attention,decode --out "$RES/kernels_attn.json" ;;
  select) TAIL=22 step select 90 python3 bench/bench_kernels.py --only select,indexer --out "$RES/kernels_select.json" ;;
  ctrain) TAIL=6 step ctrain 90 python3 bench/count_decode_ops.py --device cuda --backend triton --train 4096
      TAIL=6 step cdecode 60 python3 bench/count_decode_ops.py --device cuda --backend triton ;;
  pattn) TAIL=8 step pattn 300 python3 bench/probe_attn.py --out "$RES/probe_attn.json" ;;
  hc) TAIL=12 step hc 60 python3 bench/bench_kernels.py --only hc --out "$RES/kernels_hc.json" ;;
  flash) TAIL=25 step flash 200 python3 bench/bench_flash_shaped.py --only kernels,parity,model --layers 2 \
      --batches 1,32 --decode-steps 16 --out "$RES/flash_shaped.json" ;;
esac; done
