"""The `afdserve serve` flags beyond the engine's (kept apart from api_server so the CLI parses without
importing FastAPI)."""
from __future__ import annotations

import argparse

DEFAULT_MAX_REQUEST_BYTES = 16 * 2**20  # a request body beyond this is refused (413) before it is read whole


def add_server_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--grpc-port", type=int, default=50051, help="0 disables the gRPC server")
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    g.add_argument("--served-model-name", default=None, help="the model name clients use (default: --model)")
    g.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM before they are aborted")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    g.add_argument("--access-log", action="store_true", help="log every HTTP request")
    g.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help="refuse larger HTTP bodies (413) and gRPC messages (RESOURCE_EXHAUSTED)")
