#!/bin/bash
# Issue 16: HyperAttention's prefill on SmolLM2 (bf16) at 4K and 8K tokens against dense: one-chunk prefill time,
# one layer's attention time, perplexity of the context's last half from the prefill, and the decode rows and
# passkey retrieval with HyperAttention's own prefill (`afdserve bench sparse`). At 2K both settings below are exact
# attention. Passkey: 3 trials per depth, a spot check (run.sh's table has 20 with a dense prefill): each trial
# computes its prompt once per policy, about 25 s a trial at 4K on a 2-core host. Output: hyper-prefill.json, .txt,
# .png. Run on an idle host: times are medians of single runs.
set -eu
cd "$(dirname "$0")/../../.."
OUT=bench/results/sparse
.venv/bin/afdserve bench sparse --model smollm2 --dtype bfloat16 --trials "${TRIALS:-3}" --contexts 4096 8192 \
  --policies dense hyperattention '{"name": "hyperattention", "min_seq_len": 2048}' \
  --json $OUT/hyper-prefill.json --plot $OUT/hyper-prefill.png \
  2> "${TMPDIR:-/tmp}/bench-hyper-prefill-progress.log" | tee $OUT/hyper-prefill.txt
