"""What both kinds of AFD worker do the same way: load the model, open the transport."""
from __future__ import annotations

from pathlib import Path

from afdserve.cluster.transport import GlooTransport, ShmTransport, Transport
from afdserve.engine.config import EngineConfig
from afdserve.models.hf_config import TransformerConfig, resolve_dtype
from afdserve.models.loader import load_model


def load_worker_model(config: EngineConfig, model_dir: Path, model_config: TransformerConfig, max_model_len: int):
    # Each worker loads the whole checkpoint and uses only its halves; dropping the other half's weights is a
    # memory optimisation left for models where it matters.
    return load_model(model_dir, model_config, resolve_dtype(config.model.dtype, model_config), max_model_len)


def build_transport(kind: str, rank: int, **kwargs) -> Transport:
    if kind == "gloo":
        return GlooTransport(rank, kwargs["world_size"], kwargs["init_method"])
    if kind == "shm":
        return ShmTransport(rank, kwargs["channels"])
    raise ValueError(f"unknown transport {kind!r}")
