#!/bin/bash
# Issue 13 on an AVX-512 (no AMX) host: offline SmolLM2 throughput before (5701994: SDPA's enable_gqa in decode) and
# after (fe5916e: query heads grouped per KV head), alternating, then batch 1 in bf16 and with --quantization int8.
set -u
cd "$(dirname "$0")/../../.."
OUT=bench/results/issue13-avx512
run() {  # $1: label, rest: flags
  local label=$1; shift
  .venv/bin/afdserve bench throughput --model smollm2 "$@" --json $OUT/throughput-$label.json > $OUT/throughput-$label.txt 2>&1
  tail -2 $OUT/throughput-$label.txt
}
for round in 1 2; do
  git checkout -q 5701994 -- kernels/attention/torch_paged.py
  run gqa-bf16-c32-run$round --dtype bfloat16 --num-requests 64
  git checkout -q fe5916e -- kernels/attention/torch_paged.py
  run grouped-bf16-c32-run$round --dtype bfloat16 --num-requests 64
done
run grouped-bf16-c1 --dtype bfloat16 --concurrency 1 --num-requests 4
run grouped-int8-c1 --dtype bfloat16 --quantization int8 --concurrency 1 --num-requests 4
run grouped-fp32-c32 --dtype float32 --num-requests 64
