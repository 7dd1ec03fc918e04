#!/bin/bash
# Issue 16: attention policies on SmolLM2 (bf16) at 2K, 4K and 8K tokens: decode perplexity, passkey retrieval,
# attended fraction, unread pages and decode time (`afdserve bench sparse`). Output: sparse.json, sparse.txt,
# sparse.png. Run on an idle host: the decode times are medians of single decodes.
set -eu
cd "$(dirname "$0")/../../.."
OUT=bench/results/sparse
.venv/bin/afdserve bench sparse --model smollm2 --dtype bfloat16 --trials "${TRIALS:-20}" \
  --policies dense quest delta '{"name": "delta", "budget_pages": 32}' prflash hyperattention sparsed \
  --json $OUT/sparse.json --plot $OUT/sparse.png 2> "${TMPDIR:-/tmp}/bench-sparse-progress.log" | tee $OUT/sparse.txt
