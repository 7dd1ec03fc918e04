#!/usr/bin/env bash
# Every GPU check of the project in one run on one CUDA GPU (H100 / H200), each step capped so that the whole run
# ends inside the device tool's budget; logs and JSON go to $OUT (default bench/results/gpu-<date>).
#
#     bash bench/gpu/check_all.sh [engine-seconds] [attention-seconds] [moe-seconds]      (a cap of 0 skips a step)
#
# 1. The engine on the GPU: tests/engine/test_cuda_graphs.py under pytest (graphs captured for real against eager
#    steps), then afdserve.bench.gpu.engine_check (greedy parity against the CPU; throughput with CUDA graphs and
#    eager at concurrency 64 and 1). Needs the gguf package (carry its wheel) and transformers (in the GPU image).
# 2. afdserve.bench.gpu.attention_kernel_check: the paged attention kernels (issue #6) — tests compiled on the
#    GPU, large shapes against the torch backend, bandwidth at the target decode shape, a small tile sweep.
# 3. afdserve.bench.gpu.moe_kernel_check: the fused MoE kernels (issue #4) — correctness and a Mixtral-sized timing
#    table.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-bench/results/gpu-$(date +%Y%m%d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
# The GPU image has no install of afdserve: import this checkout as `afdserve` through a link to it.
if ! $PY -c 'import afdserve' 2>/dev/null; then
    link_dir=$(mktemp -d) && ln -s "$PWD" "$link_dir/afdserve" && export PYTHONPATH="$link_dir${PYTHONPATH:+:$PYTHONPATH}"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv; uname -m;
  $PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'; } 2>&1 | tee "$OUT/device.txt"
rc=0
if [ "${1:-300}" != 0 ]; then
    timeout 120 $PY -m pytest -q -rs -p no:cacheprovider tests/engine/test_cuda_graphs.py 2>&1 | tee "$OUT/graphs-test.log" || rc=1
    timeout "${1:-300}" $PY -m afdserve.bench.gpu.engine_check --out "$OUT/engine.json" 2>&1 | tee "$OUT/engine.log" || rc=1
fi
if [ "${2:-330}" != 0 ]; then
    timeout "${2:-330}" $PY -m afdserve.bench.gpu.attention_kernel_check --out "$OUT/attention.json" 2>&1 | tee "$OUT/attention.log" || rc=1
fi
if [ "${3:-150}" != 0 ]; then
    timeout "${3:-150}" $PY -m afdserve.bench.gpu.moe_kernel_check --out "$OUT/moe.json" 2>&1 | tee "$OUT/moe.log" || rc=1
fi
exit $rc
