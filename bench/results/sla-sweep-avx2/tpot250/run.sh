#!/bin/bash
# issue 14 benchmark at TPOT p90 <= 250 ms (an SLO this host has room under): afdserve without and with
# --tpot-slo-ms 250 and vLLM's CPU build, grid of concurrencies, then each at twice afdserve's sustainable rate.
set -x
cd /work/main
OUT=/tmp/b14/slo250
mkdir -p $OUT
A=".venv/bin/afdserve"
W="--input-len 128 --output-len 64 --goodput tpot:250 --slo-percentile 90"
GRID="--concurrency 4,8,12,16,24,32 --num-prompts 48"
wait_up() { for i in $(seq 1 120); do curl -sf $1/v1/models >/dev/null && return 0; sleep 2; done; return 1; }
warm() { $A bench sweep --base-url $1 --concurrency 8 --num-prompts 8 --output-len 16 > /dev/null; }

$A serve --port 8000 > $OUT/serve-plain.log 2>&1 & PID=$!
wait_up http://127.0.0.1:8000; warm http://127.0.0.1:8000
$A bench sweep --base-url http://127.0.0.1:8000 $GRID $W --json $OUT/grid-afdserve.json
RATE=$(python3 -c "import json;d=json.load(open('$OUT/grid-afdserve.json'));print(round(2*d['max_under_slo']['request_s'],3))")
echo "overload rate $RATE req/s (twice afdserve's sustainable rate under the SLO)" | tee $OUT/overload-rate.txt
$A bench sweep --base-url http://127.0.0.1:8000 --request-rate $RATE --num-prompts 64 $W --json $OUT/overload-afdserve.json
kill -INT $PID; wait $PID

$A serve --port 8000 --tpot-slo-ms 250 > $OUT/serve-slo.log 2>&1 & PID=$!
wait_up http://127.0.0.1:8000; warm http://127.0.0.1:8000
$A bench sweep --base-url http://127.0.0.1:8000 $GRID $W --json $OUT/grid-afdserve-tpot-slo-250.json
$A bench sweep --base-url http://127.0.0.1:8000 --request-rate $RATE --num-prompts 64 $W --json $OUT/overload-afdserve-tpot-slo-250.json
curl -s http://127.0.0.1:8000/metrics | grep "afdserve:sla_" > $OUT/metrics-tpot-slo-250.txt
kill -INT $PID; wait $PID

(cd /tmp && VLLM_CPU_KVCACHE_SPACE=4 HF_HUB_OFFLINE=1 /work/venvs/vllm/bin/python -m vllm.entrypoints.openai.api_server --model /root/.cache/afdserve/SmolLM2-135M-Instruct.Q4_1 --served-model-name smollm2 --port 8011 --dtype float32 --max-model-len 2048 > $OUT/vllm-serve.log 2>&1) &
wait_up http://127.0.0.1:8011; warm http://127.0.0.1:8011
$A bench sweep --base-url http://127.0.0.1:8011 $GRID $W --json $OUT/grid-vllm.json
$A bench sweep --base-url http://127.0.0.1:8011 --request-rate $RATE --num-prompts 64 $W --json $OUT/overload-vllm.json
pkill -INT -f vllm.entrypoints.openai.api_server
$A bench plot "afdserve=$OUT/grid-afdserve.json" "afdserve --tpot-slo-ms 250=$OUT/grid-afdserve-tpot-slo-250.json" "vLLM 0.32 CPU build=$OUT/grid-vllm.json" --out $OUT/sla-sweep.png
echo ALLDONE3
