"""AFDExecutor: the executor interface (ARCHITECTURE.md, seam 5) over Ray actors.

    EngineCore ──execute(SchedulerOutput)──► AttentionWorker (KV cache, attention, router, LM head, sampler)
                                                   ⇅ per layer and micro-batch, over the transport (never Ray)
                                              FFNWorker (MLP / experts)

One Ray call per step carries the scheduler's output to the attention worker; the per-layer tensors go
point-to-point. This slice runs 1A1F.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import ray

from cluster.attention_worker import AttentionWorker
from cluster.ffn_worker import FFNWorker
from cluster.stage_timer import summarize
from cluster.transport import create_shm_channels
from engine.config import EngineConfig
from engine.model_runner import ModelRunnerOutput
from engine.scheduler import SchedulerOutput
from models.hf_config import TransformerConfig

ATTENTION_RANK, FFN_RANK = 0, 1


def init_ray(address: str | None) -> None:
    if ray.is_initialized():
        return
    if address is None:  # a private local cluster; actors take no CPU slots so any xAyF fits on a small host
        ray.init(include_dashboard=False, log_to_driver=True, configure_logging=False)
    else:
        ray.init(address=address, log_to_driver=True, configure_logging=False)


class AFDExecutor:
    def __init__(self, config: EngineConfig, model_dir: Path, model_config: TransformerConfig, num_kv_blocks: int,
                 max_model_len: int):
        par = config.parallel
        if (par.num_attention_workers, par.num_ffn_workers) != (1, 1):
            raise ValueError(f"afd={par.afd!r}: this build runs 1A1F only")
        init_ray(par.ray_address)
        threads = par.threads_per_worker or max(1, (os.cpu_count() or 2) // 2)
        remote_attention = ray.remote(num_cpus=0)(AttentionWorker)
        remote_ffn = ray.remote(num_cpus=0)(FFNWorker)
        self.attention = remote_attention.remote(config, model_dir, model_config, num_kv_blocks, max_model_len,
                                                 ATTENTION_RANK, threads)
        self.ffn = remote_ffn.remote(config, model_dir, model_config, max_model_len, FFN_RANK, threads)
        self._shm_handles = []
        self._connect(par.transport, config, model_config)
        ray.get(self.ffn.start.remote(ATTENTION_RANK))

    def _connect(self, kind: str, config: EngineConfig, model_config: TransformerConfig) -> None:
        if kind == "gloo":
            ip, port = ray.get([self.attention.node_ip.remote(), self.attention.free_port.remote()])
            common = dict(world_size=2, init_method=f"tcp://{ip}:{port}")
        else:
            # One slot per micro-batch in flight; a slot holds the largest message: a full step's tokens x hidden.
            tokens = config.scheduler.max_num_batched_tokens
            slot_bytes = tokens * model_config.hidden_size * 4
            channels, self._shm_handles = create_shm_channels(
                [(ATTENTION_RANK, FFN_RANK), (FFN_RANK, ATTENTION_RANK)], config.parallel.micro_batches + 1,
                slot_bytes, f"afd-{uuid.uuid4().hex[:8]}")
            common = dict(channels=channels)
        ray.get([self.attention.init_transport.remote(kind, FFN_RANK, **common),
                 self.ffn.init_transport.remote(kind, **common)])

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return ray.get(self.attention.execute.remote(scheduler_output))

    def stage_times(self) -> dict:
        """Per-layer attention / FFN compute and wait times, and each worker's bubble, since start."""
        attention, ffn = ray.get([self.attention.stage_times.remote(), self.ffn.stage_times.remote()])
        return summarize(attention, ffn)

    def shutdown(self) -> None:
        try:
            ray.get(self.attention.stop_ffn.remote(), timeout=30)
        finally:
            for actor in (self.attention, self.ffn):
                ray.kill(actor)
            for handle in self._shm_handles:
                handle.close(unlink=True)
            self._shm_handles = []
