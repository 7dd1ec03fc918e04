"""afdserve: an LLM serving engine built around attention-FFN disaggregation (AFD).

The repository root is this package: its folders `engine/`, `kernels/`, `cluster/`, `models/` and `bench/` install
and import as `afdserve.engine`, `afdserve.kernels`, ... (pyproject.toml maps the package onto the root), so an
install adds one top-level import package and never shadows another distribution's `kernels` or `models`.

    from afdserve import LLM, SamplingParams

The public names load on first use, so that importing one subpackage (a kernel on a GPU image without Ray, say)
does not import the whole engine.
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from afdserve.engine import (CacheConfig, CompletionOutput, EngineConfig, LLM, ModelConfig, RequestOutput,
                                 SamplingParams, SchedulerConfig)

try:
    __version__ = version("afdserve")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineConfig", "ModelConfig",
           "CacheConfig", "SchedulerConfig", "__version__"]


def __getattr__(name: str):
    if name in __all__:
        from afdserve import engine
        return getattr(engine, name)
    raise AttributeError(f"module 'afdserve' has no attribute {name!r}")
