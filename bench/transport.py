"""A<->F transport micro-benchmark: per-step time of L layers of A->F->A round trips of a [T, H] tensor between two
Ray actors, for each transport behind cluster/transport.py (the same exchange the AFD pipeline makes per layer)."""
from __future__ import annotations

import statistics
import threading
import time
import uuid

import torch

from afdserve.cluster.afd_executor import init_ray
from afdserve.cluster.transport import create_shm_channels
from afdserve.cluster.worker_common import build_transport

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class _Peer:
    def __init__(self, rank: int):
        torch.set_num_threads(1)
        self.rank = rank
        self.transport = None

    def address(self) -> tuple[str, int]:
        import socket

        import ray
        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def connect(self, kind: str, **kwargs) -> None:
        self.transport = build_transport(kind, self.rank, **kwargs)

    def echo(self, count: int, shape: tuple, dtype: str) -> None:
        """Serves `count` round trips in a thread so the actor stays responsive."""
        def loop():
            buf = torch.empty(shape, dtype=_DTYPES[dtype])
            for _ in range(count):
                self.transport.send(self.transport.recv(buf, 1 - self.rank), 1 - self.rank)
            self.transport.flush()
        threading.Thread(target=loop, daemon=True).start()

    def ping(self, steps: int, layers: int, shape: tuple, dtype: str) -> list[float]:
        x = torch.randn(shape).to(_DTYPES[dtype])
        out = torch.empty_like(x)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            for _ in range(layers):
                self.transport.send(x, 1 - self.rank)
                self.transport.recv(out, 1 - self.rank)
            times.append(time.perf_counter() - start)
        return times

    def close(self) -> None:
        self.transport.close()


def run_transport_bench(kind: str, steps: int = 50, layers: int = 30, tokens: int = 32, hidden: int = 576,
                        dtype: str = "float32") -> dict:
    import ray
    init_ray(None)
    peer = ray.remote(num_cpus=0)(_Peer)
    a, f = peer.remote(0), peer.remote(1)
    handles = []
    try:
        if kind == "gloo":
            ip, port = ray.get(a.address.remote())
            kwargs = dict(world_size=2, init_method=f"tcp://{ip}:{port}")
        else:
            nbytes = tokens * hidden * torch.empty(0, dtype=_DTYPES[dtype]).element_size()
            channels, handles = create_shm_channels([(0, 1), (1, 0)], 2, nbytes, f"afdbench-{uuid.uuid4().hex[:8]}")
            kwargs = dict(channels=channels)
        ray.get([a.connect.remote(kind, **kwargs), f.connect.remote(kind, **kwargs)])
        ray.get(f.echo.remote(steps * layers, (tokens, hidden), dtype))
        times = ray.get(a.ping.remote(steps, layers, (tokens, hidden), dtype))
        ray.get([a.close.remote(), f.close.remote()])
    finally:
        for actor in (a, f):
            ray.kill(actor)
        for h in handles:
            h.close(unlink=True)
    ms = [t * 1000 for t in times[steps // 5:]]  # the first fifth is warm-up
    return {"transport": kind, "layers": layers, "shape": [tokens, hidden], "dtype": dtype,
            "step_ms_median": statistics.median(ms), "step_ms_min": min(ms),
            "round_trip_us_median": statistics.median(ms) / layers * 1000}


def format_transport_result(r: dict) -> str:
    return (f"{r['transport']:>5}: {r['layers']} layers of A->F->A [{r['shape'][0]}x{r['shape'][1]}] {r['dtype']}: "
            f"median {r['step_ms_median']:.2f} ms per step ({r['round_trip_us_median']:.0f} us per round trip), "
            f"min {r['step_ms_min']:.2f} ms")
