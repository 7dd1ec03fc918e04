"""What both kinds of AFD worker do the same way: open the transport, say where they run."""
from __future__ import annotations

from afdserve.cluster.transport import ProcessGroupTransport, ShmTransport, Transport


def build_transport(kind: str, rank: int, device, **kwargs) -> Transport:
    """kind: gloo or nccl (kwargs world_size, init_method; nccl moves tensors on `device`, the worker's own GPU), or
    shm (kwargs channels)."""
    if kind in ("gloo", "nccl"):
        return ProcessGroupTransport(rank, kwargs["world_size"], kwargs["init_method"], kind, device)
    if kind == "shm":
        return ShmTransport(rank, kwargs["channels"])
    raise ValueError(f"unknown transport {kind!r}")


def node_ip() -> str:
    import ray
    return ray.util.get_node_ip_address()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
