#!/usr/bin/env bash
# Every GPU check of the project in one run on one CUDA GPU (H100 / H200), each step capped so that the whole run
# ends inside 8 minutes (the caps sum to 470 s); logs and JSON go to $OUT (default bench/results/gpu-<date>).
#
#     bash bench/gpu/check_all.sh [engine-s] [moe-engine-s] [transport-s] [attention-s] [moe-kernels-s]
#                                                                  (defaults 200 120 30 70 50; a cap of 0 skips a step)
#
# 1. The engine on the GPU: tests/engine/test_cuda_graphs.py under pytest (graphs captured for real against eager
#    steps) and tests/kernels/test_triton_mla.py (the MLA decode kernel compiled, against the torch path), then
#    afdserve.bench.gpu.engine_check on SmolLM2's shape (greedy parity against the CPU, locally and under AFD;
#    throughput with CUDA graphs, eager, fp8 weights + activations, and --afd 1A1F as two local processes on the GPU,
#    at concurrency 64 and 1). Needs the gguf package (carry its wheel) and transformers (in the GPU image).
# 2. engine_check on a random-weight Qwen3-MoE of 4.0B parameters (written first, ~8 GB): graphs, eager and fp8 at
#    concurrency 64.
# 3. afdserve.bench.gpu.transport_check: the A<->F messages between two processes over gloo with GPU tensors, and
#    over NCCL where there are two GPUs (NCCL refuses two ranks on one GPU); byte checks, then round-trip times.
# 4. afdserve.bench.gpu.attention_kernel_check: the paged attention kernels (issue #6) — tests compiled on the
#    GPU, large shapes against the torch backend, bandwidth at the target decode shape (no tile sweep here).
# 5. afdserve.bench.gpu.moe_kernel_check: the fused MoE kernels (issue #4) — correctness and a Mixtral-sized timing
#    table.
# AFD runs its workers as local processes here (--distributed-executor-backend mp): the GPU image has no Ray.
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
step() {  # step <cap-seconds> <log name> <command...>: runs the command under its cap, logging; a cap of 0 skips it
    local cap=$1 name=$2; shift 2
    [ "$cap" = 0 ] && return 0
    local start=$SECONDS
    timeout "$cap" "$@" 2>&1 | tee "$OUT/$name.log"
    local status=${PIPESTATUS[0]}
    echo "[$name: exit $status after $((SECONDS - start)) s of $cap]" | tee -a "$OUT/$name.log"
    [ "$status" = 0 ] || rc=1
}
engine=${1:-200}
if [ "$engine" != 0 ]; then
    step 50 graphs-test $PY -m pytest -q -rs -p no:cacheprovider tests/engine/test_cuda_graphs.py \
        tests/kernels/test_triton_mla.py
    step $((engine - 50)) engine $PY -m afdserve.bench.gpu.engine_check --modes graphs,eager,fp8,afd \
        --batch-1-requests 4 --out "$OUT/engine.json"
fi
step "${2:-120}" moe-engine $PY -m afdserve.bench.gpu.engine_check --random-moe /tmp/afdserve-moe-4b --parity-tokens 0 \
    --modes graphs,eager,fp8 --concurrency 64 --num-requests 128 --out "$OUT/moe-engine.json"
step "${3:-30}" transport $PY -m afdserve.bench.gpu.transport_check --out "$OUT/transport.json"
step "${4:-70}" attention $PY -m afdserve.bench.gpu.attention_kernel_check --no-sweep --out "$OUT/attention.json"
step "${5:-50}" moe $PY -m afdserve.bench.gpu.moe_kernel_check --out "$OUT/moe.json"
exit $rc
