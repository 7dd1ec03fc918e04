"""The executor interface (docs/architecture.md, seam 5): `execute(scheduler_output) -> ModelRunnerOutput`.

LocalExecutor runs the whole model in this process; cluster/ provides the AFD executor with the same contract.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

from afdserve.engine.config import EngineConfig
from afdserve.engine.model_runner import ModelRunner, ModelRunnerOutput
from afdserve.engine.scheduler import SchedulerOutput
from afdserve.models.hf_config import TransformerConfig
from afdserve.models.layers.expert_cache import ExpertCacheTotals


class WorkerFailedError(RuntimeError):
    """A worker died (or failed) during a step. The executor has already replaced its workers, but the KV caches
    they held are gone: the running requests recompute theirs on the new workers (a request in a second failed step
    ends with this error instead), and the engine goes on."""


class Executor(Protocol):
    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput: ...

    def latest_stage_times(self) -> dict | None:
        """AFD's per-layer attention / FFN / transfer times and bubbles (cluster/stage_timer.summarize); None for
        executors without stages."""

    def expert_cache_totals(self) -> ExpertCacheTotals | None:
        """The expert caches of whichever process runs the experts (--expert-cache-size); None without them."""

    def shutdown(self) -> None: ...


class LocalExecutor:
    def __init__(self, config: EngineConfig, model_dir: Path, model_config: TransformerConfig, num_kv_blocks: int,
                 max_model_len: int):
        self.runner = ModelRunner(config, model_dir, model_config, num_kv_blocks, max_model_len)

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute(scheduler_output)

    def latest_stage_times(self) -> dict | None:
        return None

    def expert_cache_totals(self) -> ExpertCacheTotals | None:
        return self.runner.model.expert_cache_totals()

    def shutdown(self) -> None:
        pass


def make_executor(config: EngineConfig, model_dir: Path, model_config: TransformerConfig, num_kv_blocks: int,
                  max_model_len: int) -> Executor:
    """LocalExecutor, or the AFD executor (Ray actors or local processes) when `config.parallel.afd` is set."""
    if config.parallel.enabled:
        from afdserve.cluster.afd_executor import AFDExecutor  # Ray is imported only when AFD on Ray is asked for
        return AFDExecutor(config, model_dir, model_config, num_kv_blocks, max_model_len)
    return LocalExecutor(config, model_dir, model_config, num_kv_blocks, max_model_len)
