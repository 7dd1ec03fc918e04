#!/bin/bash
# Issue 17: SmolLM2 refactored into Read-ME's MoE (8 experts + 25% shared channels, calibrated on the first 2,048
# tokens of pydoc_data.topics), perplexity on 1,024 held-out tokens: dense, every expert, top-1 and top-2, the
# pre-gating router untrained and trained; expert-cache hit rates (Belady, LRU) on the trained router's choices for
# 4,096 tokens read by 1 and 32 streams; decode step latency of the trained top-1 model with 2, 4, 6 or all 8
# experts resident per layer (the rest memory-mapped), LRU and Belady, at 1 and 32 streams
# (`afdserve bench readme`). Output: readme.json, readme.txt.
set -eu
cd "$(dirname "$0")/../../.."
OUT=bench/results/readme
.venv/bin/afdserve bench readme --model smollm2 --experts 8 --top-ks 1 2 --json $OUT/readme.json \
  2> "${TMPDIR:-/tmp}/bench-readme-progress.log" | tee $OUT/readme.txt
