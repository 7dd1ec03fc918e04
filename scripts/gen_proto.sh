#!/usr/bin/env bash
# Regenerates the gRPC Python code committed next to engine/server/proto/afdserve/v1/generation.proto.
#   scripts/gen_proto.sh [OUT_DIR]    (default: engine/server/proto; PYTHON defaults to .venv/bin/python)
# grpcio-tools is pinned in pyproject.toml so that the output is byte-identical wherever it runs;
# tests/server/test_grpc.py checks that regenerating changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
PROTO_ROOT=engine/server/proto
OUT="${1:-$PROTO_ROOT}"
mkdir -p "$OUT/afdserve/v1"
# Paths relative to PROTO_ROOT keep the descriptor's file name "afdserve/v1/generation.proto" (what reflection shows).
"$PYTHON" -m grpc_tools.protoc -I "$PROTO_ROOT" \
    --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" \
    afdserve/v1/generation.proto
# protoc writes imports relative to the proto root ("from afdserve.v1 import ..."); the package lives under engine.
sed -i "s/^from afdserve\.v1 import /from afdserve.engine.server.proto.afdserve.v1 import /" \
    "$OUT/afdserve/v1/generation_pb2_grpc.py"
