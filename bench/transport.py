"""A<->F transport benchmark: two processes (torch.multiprocessing, no Ray) exchange an AFD layer's messages through
cluster/transport.py, byte-checked, then time L layers of A->F->A round trips of a [T, H] activation per step.

Each check round, rank 0 (attention) sends a [tokens, hidden] activation, its fp8 wire form (cluster/wire.py: e4m3
codes and per-token scales) and an MoE routing ([tokens, k] int64 ids and fp32 weights); rank 1 (FFN) checks every
byte against the same seeded tensors and answers with a [tokens, hidden] result, which rank 0 checks. The timed loop
sends the activation and receives the result `layers` times per step, as one AFD step's layers do; the first fifth
of the steps is warm-up.

Tensors live on `device`: gloo stages a CUDA tensor through the host, NCCL moves it GPU to GPU (rank r on cuda:r,
so NCCL needs two GPUs: with fewer its row says why it was skipped), shm copies through host shared memory.
`afdserve bench transport` runs it on a CPU; bench/gpu/transport_check.py on a GPU.
"""
from __future__ import annotations

import statistics
import time
import uuid

import torch
import torch.multiprocessing as mp

from afdserve.cluster.transport import create_shm_channels
from afdserve.cluster.wire import ActivationWire
from afdserve.cluster.worker_common import build_transport, free_port

TRANSPORTS = ("gloo", "shm", "nccl")
_SENT = ("activation", "fp8_codes", "fp8_scales", "topk_ids", "topk_weights")  # A->F, in order


def step_messages(tokens: int, hidden: int, top_k: int, dtype: torch.dtype, device: str, seed: int) -> dict:
    """The messages of one layer of one micro-batch, the same in both processes for a seed."""
    gen = torch.Generator().manual_seed(seed)
    activation = torch.randn(tokens, hidden, generator=gen).to(dtype)
    codes, scales = ActivationWire("fp8").encode(activation)
    messages = {"activation": activation, "fp8_codes": codes, "fp8_scales": scales,
                "topk_ids": torch.randint(0, 64, (tokens, top_k), generator=gen),
                "topk_weights": torch.rand(tokens, top_k, generator=gen),
                "result": torch.randn(tokens, hidden, generator=gen).to(dtype)}
    return {name: t.to(device) for name, t in messages.items()}


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def run_peer(rank: int, kind: str, connect: dict, device: str, spec: dict, results) -> None:
    """One side of the exchange; rank 0 puts {"mismatches": [...], "step_ms": [...]} into `results`."""
    if kind == "nccl":
        device = f"cuda:{rank}"
    torch.set_num_threads(1)
    transport = build_transport(kind, rank, device=device, **connect)
    dtype, peer = getattr(torch, spec["dtype"]), 1 - rank
    shape = (spec["tokens"], spec["hidden"], spec["top_k"], dtype, device)
    mismatches, step_ms = [], []
    try:
        for round_ in range(spec["check_rounds"]):
            expected = step_messages(*shape, seed=round_)
            if rank == 0:
                for name in _SENT:
                    transport.send(expected[name], peer)
                if not _same_bytes(transport.recv(torch.empty_like(expected["result"]), peer), expected["result"]):
                    mismatches.append(f"round {round_}: result")
            else:
                for name in _SENT:
                    if not _same_bytes(transport.recv(torch.empty_like(expected[name]), peer), expected[name]):
                        raise AssertionError(f"round {round_}: {name} arrived changed")
                transport.send(expected["result"], peer)
        transport.flush()
        x = step_messages(*shape, seed=0)["activation"]
        out = torch.empty_like(x)
        for _ in range(spec["steps"]):
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            start = time.perf_counter()
            for _ in range(spec["layers"]):
                if rank == 0:
                    transport.send(x, peer)
                    transport.recv(out, peer)
                else:
                    transport.send(transport.recv(out, peer), peer)
            transport.flush()
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            step_ms.append(1e3 * (time.perf_counter() - start))
    finally:
        transport.close()
    if rank == 0:
        results.put({"mismatches": mismatches, "step_ms": step_ms})


def run_transport_bench(kind: str, steps: int = 50, layers: int = 30, tokens: int = 32, hidden: int = 576,
                        dtype: str = "float32", device: str = "cpu", top_k: int = 8, check_rounds: int = 3,
                        timeout_s: float = 300) -> dict:
    """Both processes for one transport: a row of the result."""
    if kind not in TRANSPORTS:
        raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {kind!r}")
    spec = dict(steps=steps, layers=layers, tokens=tokens, hidden=hidden, dtype=dtype, top_k=top_k,
                check_rounds=check_rounds)
    row = {"transport": kind, "device": device, "layers": layers, "shape": [tokens, hidden], "dtype": dtype}
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind == "nccl" and gpus < 2:
        return {**row, "skipped": f"nccl needs one GPU per rank (NCCL refuses two ranks on one GPU); this host has "
                                  f"{gpus}"}
    handles = []
    if kind == "shm":
        # The largest message of the exchange: the activation in fp32 (or the int64 ids, if wider).
        slot_bytes = tokens * max(hidden * 4, top_k * 8)
        channels, handles = create_shm_channels([(0, 1), (1, 0)], len(_SENT) + 1, slot_bytes,
                                                f"afdbench-{uuid.uuid4().hex[:8]}", opener_untracks=False)
        connect = dict(channels=channels)
    else:
        connect = dict(world_size=2, init_method=f"tcp://127.0.0.1:{free_port()}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=run_peer, args=(rank, kind, connect, device, spec, results)) for rank in (0, 1)]
    try:
        for proc in procs:
            proc.start()
        measured = results.get(timeout=timeout_s)  # before join: a process with a queued item exits only once read
        for proc in procs:
            proc.join(timeout_s)
    except Exception as e:  # noqa: BLE001 - a peer that died or hung: the row says so, the other rows still run
        return {**row, "failed": f"{type(e).__name__}: exit codes {[proc.exitcode for proc in procs]}"}
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        for handle in handles:
            handle.close(unlink=True)
    if any(proc.exitcode != 0 for proc in procs):
        return {**row, "failed": f"exit codes {[proc.exitcode for proc in procs]}"}
    ms = measured["step_ms"][steps // 5:]
    per_layer_us = sorted(1e3 * t / layers for t in ms)
    return {**row, "bytes_checked": not measured["mismatches"], "mismatches": measured["mismatches"],
            "step_ms_median": statistics.median(ms), "step_ms_min": min(ms),
            "round_trip_us_median": statistics.median(per_layer_us),
            "round_trip_us_p90": per_layer_us[int(0.9 * (len(per_layer_us) - 1))]}


def format_transport_result(r: dict) -> str:
    if "skipped" in r or "failed" in r:
        return f"{r['transport']:>5}: {r.get('skipped') or 'FAILED ' + r['failed']}"
    return (f"{r['transport']:>5}: {r['layers']} layers of A->F->A [{r['shape'][0]}x{r['shape'][1]}] {r['dtype']} on "
            f"{r['device']}: median {r['step_ms_median']:.2f} ms per step ({r['round_trip_us_median']:.0f} us per "
            f"round trip, p90 {r['round_trip_us_p90']:.0f}), min {r['step_ms_min']:.2f} ms; messages "
            f"{'byte-checked' if r['bytes_checked'] else 'CHANGED: ' + ', '.join(r['mismatches'])}")
