#!/usr/bin/env bash
# Every GPU check of the project in one run on one CUDA GPU (H100 / H200), each step capped so that the whole run
# ends inside the device tool's budget; logs and JSON go to $OUT (default bench/results/gpu-<date>).
#
#     bash bench/gpu/check_all.sh [attention-seconds] [moe-seconds]
#
# 1. afdserve.bench.gpu.attention_kernel_check: the paged attention kernels (issue #6) — tests compiled on the
#    GPU, large shapes against the torch backend, bandwidth at the target decode shape, a small tile sweep.
# 2. afdserve.bench.gpu.moe_kernel_check: the fused MoE kernels (issue #4) — correctness and a Mixtral-sized timing
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
timeout "${1:-330}" $PY -m afdserve.bench.gpu.attention_kernel_check --out "$OUT/attention.json" 2>&1 | tee "$OUT/attention.log" || rc=1
timeout "${2:-150}" $PY -m afdserve.bench.gpu.moe_kernel_check --out "$OUT/moe.json" 2>&1 | tee "$OUT/moe.log" || rc=1
exit $rc
