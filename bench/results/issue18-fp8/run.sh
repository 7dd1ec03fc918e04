#!/usr/bin/env bash
# #18's fp8 rows on this CPU host: perplexity of --quantization fp8 (W8A8 e4m3) and of the fp8 A->F wire on SmolLM2
# bf16 (2,048 tokens of pydoc_data.topics), and their speed here (fp8 is a Hopper format: a CPU runs it through
# oneDNN, for its accuracy, not its speed). Run from the repository root after `make setup`.
set -euo pipefail
R=bench/results/issue18-fp8
A=.venv/bin/afdserve
$A bench weight-quant --dtype bfloat16 --max-num-seqs 4 --quantizations none int8 fp8 --json $R/weight-quant-bf16.json
for wire in auto fp8; do
    $A bench weight-quant --dtype bfloat16 --max-num-seqs 4 --quantizations none --afd 1A1F --afd-transport shm \
        --afd-wire $wire --json $R/wire-$wire-perplexity.json
done
for wire in auto fp8; do
    $A bench throughput --dtype bfloat16 --afd 1A1F --afd-transport shm --afd-wire $wire --num-requests 64 \
        --json $R/throughput-afd-1a1f-wire-$wire-c32.json
done
for q in none fp8; do
    $A bench throughput --dtype bfloat16 --concurrency 1 --num-requests 4 $( [ $q = none ] || echo --quantization $q ) \
        --json $R/throughput-$q-c1.json
done
