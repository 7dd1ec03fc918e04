"""The A<->F transport benchmark (bench/transport.py) on a GPU, as bench/gpu/check_all.sh runs it: gloo with the
messages on the GPU (staged through the host) and NCCL (GPU to GPU, where there are two GPUs), at DeepSeek-V3 /
Step-3's hidden size; byte checks, then round-trip times.

    python -m afdserve.bench.gpu.transport_check [--transports gloo,nccl] [--device cuda] [--out transport.json]

Without Ray (the GPU image has none). On a CPU, gloo is its dry run (tests/cluster/test_transport.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from afdserve.bench.host import host_info
from afdserve.bench.transport import format_transport_result, run_transport_bench


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--transports", default="gloo,nccl")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=64, help="rows of one micro-batch's activation")
    p.add_argument("--hidden", type=int, default=7168, help="DeepSeek-V3 / Step-3's hidden size")
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--layers", type=int, default=61)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--check-rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    result = {"host": host_info(args.device), "time": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": []}
    ok = True
    for kind in args.transports.split(","):
        row = run_transport_bench(kind, args.steps, args.layers, args.tokens, args.hidden, args.dtype, args.device,
                                  args.top_k, args.check_rounds)
        result["rows"].append(row)
        ok = ok and (row.get("bytes_checked", False) or "skipped" in row)
        print(format_transport_result(row), flush=True)
        if args.out is not None:  # after each row: a run cut short by its time cap keeps what it measured
            args.out.write_text(json.dumps(result, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
