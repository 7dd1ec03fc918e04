"""A<->F transport check without Ray: two processes (torch.multiprocessing) exchange an AFD step's messages through
cluster/transport.py, for each transport given, and time the per-layer A->F->A round trip.

    python -m afdserve.bench.gpu.transport_check [--transports gloo,nccl] [--device cuda] [--out transport.json]

Each round, rank 0 (attention) sends a [tokens, hidden] activation, its fp8 wire form (cluster/wire.py: e4m3 codes
and per-token scales) and an MoE routing ([tokens, k] int64 ids and fp32 weights); rank 1 (FFN) checks every byte
against the same seeded tensors and answers with a [tokens, hidden] result, which rank 0 checks. The timed loop then
sends the activation and receives the result `layers` times per step (no checks), as one AFD step's layers do.

Tensors live on `--device` (gloo stages a CUDA tensor through the host; NCCL moves it GPU to GPU). NCCL needs one GPU
per rank: with fewer than two GPUs its row is skipped, and the reason is written to the JSON. On a CPU, gloo is the
dry run of this script (tests/cluster/test_transport.py).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from afdserve.bench.host import host_info
from afdserve.cluster.wire import ActivationWire
from afdserve.cluster.worker_common import build_transport, free_port


def step_messages(tokens: int, hidden: int, top_k: int, dtype: torch.dtype, device: str, seed: int) -> dict:
    """The messages of one layer of one micro-batch, the same in both processes for a seed."""
    gen = torch.Generator().manual_seed(seed)
    activation = torch.randn(tokens, hidden, generator=gen).to(dtype)
    codes, scales = ActivationWire("fp8").encode(activation)
    return {"activation": activation.to(device), "fp8_codes": codes.to(device), "fp8_scales": scales.to(device),
            "topk_ids": torch.randint(0, 64, (tokens, top_k), generator=gen).to(device),
            "topk_weights": torch.rand(tokens, top_k, generator=gen).to(device),
            "result": torch.randn(tokens, hidden, generator=gen).to(dtype).to(device)}


def _peer_device(device: str, rank: int, kind: str) -> str:
    """NCCL: rank r on cuda:r; otherwise both ranks share `device`."""
    return f"cuda:{rank}" if kind == "nccl" else device


def run_peer(rank: int, kind: str, init_method: str, device: str, spec: dict, results) -> None:
    """One side of the exchange; rank 0 puts {"mismatches": [...], "step_ms": [...]} into `results`."""
    device = _peer_device(device, rank, kind)
    transport = build_transport(kind, rank, world_size=2, init_method=init_method, device=device)
    dtype = getattr(torch, spec["dtype"])
    mismatches, step_ms = [], []
    try:
        for round_ in range(spec["check_rounds"]):
            expected = step_messages(spec["tokens"], spec["hidden"], spec["top_k"], dtype, device, seed=round_)
            sent = ("activation", "fp8_codes", "fp8_scales", "topk_ids", "topk_weights")
            if rank == 0:
                for name in sent:
                    transport.send(expected[name], 1)
                got = transport.recv(torch.empty_like(expected["result"]), 1)
                if not torch.equal(got.view(torch.uint8), expected["result"].view(torch.uint8)):
                    mismatches.append(f"round {round_}: result")
            else:
                for name in sent:
                    got = transport.recv(torch.empty_like(expected[name]), 0)
                    if not torch.equal(got.view(torch.uint8), expected[name].view(torch.uint8)):
                        raise AssertionError(f"round {round_}: {name} arrived changed")
                transport.send(expected["result"], 0)
        transport.flush()
        x = step_messages(spec["tokens"], spec["hidden"], spec["top_k"], dtype, device, seed=0)["activation"]
        out = torch.empty_like(x)
        for _ in range(spec["steps"]):
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(spec["layers"]):
                if rank == 0:
                    transport.send(x, 1)
                    transport.recv(out, 1)
                else:
                    transport.send(transport.recv(out, 0), 0)
            transport.flush()
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            step_ms.append(1e3 * (time.perf_counter() - start))
    finally:
        transport.close()
    if rank == 0:
        results.put({"mismatches": mismatches, "step_ms": step_ms})


def check_transport(kind: str, device: str, spec: dict) -> dict:
    """Both processes for one transport; a row of the result."""
    if kind == "nccl" and (not torch.cuda.is_available() or torch.cuda.device_count() < 2):
        return {"transport": kind, "skipped": f"nccl needs one GPU per rank; this host has "
                                              f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}"}
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init_method = f"tcp://127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=run_peer, args=(rank, kind, init_method, device, spec, results)) for rank in (0, 1)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(spec["timeout_s"])
    if any(proc.exitcode != 0 for proc in procs):
        for proc in procs:
            proc.kill()
        return {"transport": kind, "failed": f"exit codes {[proc.exitcode for proc in procs]}"}
    measured = results.get(timeout=10)
    per_layer_us = [1e3 * ms / spec["layers"] for ms in measured["step_ms"]]
    return {"transport": kind, "device": device, "bytes_checked": not measured["mismatches"],
            "mismatches": measured["mismatches"], "step_ms_median": statistics.median(measured["step_ms"]),
            "round_trip_us_median": statistics.median(per_layer_us),
            "round_trip_us_p90": sorted(per_layer_us)[int(0.9 * (len(per_layer_us) - 1))]}


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
    p.add_argument("--timeout-s", type=float, default=120)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    spec = {k: getattr(args, k) for k in ("tokens", "hidden", "top_k", "dtype", "layers", "steps", "check_rounds",
                                          "timeout_s")}
    result = {"host": host_info(args.device), "spec": spec, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": []}
    ok = True
    for kind in args.transports.split(","):
        row = check_transport(kind, args.device, spec)
        result["rows"].append(row)
        ok = ok and (row.get("bytes_checked", False) or "skipped" in row)
        print(json.dumps(row), flush=True)
        if args.out is not None:
            args.out.write_text(json.dumps(result, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
