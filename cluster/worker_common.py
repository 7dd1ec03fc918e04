"""What both kinds of AFD worker do the same way: open the transport."""
from __future__ import annotations

from afdserve.cluster.transport import GlooTransport, ShmTransport, Transport


def build_transport(kind: str, rank: int, **kwargs) -> Transport:
    if kind == "gloo":
        return GlooTransport(rank, kwargs["world_size"], kwargs["init_method"])
    if kind == "shm":
        return ShmTransport(rank, kwargs["channels"])
    raise ValueError(f"unknown transport {kind!r}")
