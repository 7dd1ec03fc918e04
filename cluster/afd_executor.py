"""AFDExecutor: the executor interface (ARCHITECTURE.md, seam 5) over Ray actors, for any xAyF.

    EngineCore ──execute(SchedulerOutput)──► x AttentionWorkers (each: its requests' KV cache, attention, router,
                                              │                  LM head, sampler)
                                              ⇅ per layer and micro-batch, over the transport (never Ray)
                                             y FFNWorkers (MLP / experts; with y > 1 each holds a shard)

One Ray call per attention worker per step carries its share of the scheduler's output (each scheduled request
names its attention rank: engine/dp_scheduler.py); the per-layer tensors go point-to-point. Ranks on the data plane:
attention workers 0..x-1, FFN workers x..x+y-1.
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
        x, y = par.num_attention_workers, par.num_ffn_workers
        init_ray(par.ray_address)
        threads = par.threads_per_worker or max(1, (os.cpu_count() or 2) // (x + y))
        self.attention_ranks = list(range(x))
        self.ffn_ranks = list(range(x, x + y))
        remote_attention = ray.remote(num_cpus=0)(AttentionWorker)
        remote_ffn = ray.remote(num_cpus=0)(FFNWorker)
        self.attention = [remote_attention.remote(config, model_dir, model_config, num_kv_blocks, max_model_len,
                                                  rank, threads) for rank in self.attention_ranks]
        self.ffn = [remote_ffn.remote(config, model_dir, model_config, max_model_len, rank, threads, index, y)
                    for index, rank in enumerate(self.ffn_ranks)]
        self._shm_handles = []
        self._connect(par.transport, config, model_config)
        ray.get([ffn.start.remote(self.attention_ranks) for ffn in self.ffn])

    def _connect(self, kind: str, config: EngineConfig, model_config: TransformerConfig) -> None:
        if kind == "gloo":
            ip, port = ray.get([self.attention[0].node_ip.remote(), self.attention[0].free_port.remote()])
            common = dict(world_size=len(self.attention) + len(self.ffn), init_method=f"tcp://{ip}:{port}")
        else:
            # One slot per micro-batch in flight; a slot holds the largest message: a full step's tokens x hidden.
            tokens = config.scheduler.max_num_batched_tokens
            slot_bytes = tokens * model_config.hidden_size * 4
            pairs = [p for a in self.attention_ranks for f in self.ffn_ranks for p in ((a, f), (f, a))]
            channels, self._shm_handles = create_shm_channels(pairs, config.parallel.micro_batches + 1, slot_bytes,
                                                              f"afd-{uuid.uuid4().hex[:8]}")
            common = dict(channels=channels)
        ray.get([w.init_transport.remote(kind, self.ffn_ranks, **common) for w in self.attention] +
                [w.init_transport.remote(kind, **common) for w in self.ffn])

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Every attention worker runs every step, an idle one too: the FFN workers serve all ranks in lockstep."""
        if len(self.attention) == 1:
            return ray.get(self.attention[0].execute.remote(scheduler_output))
        indices: list[list[int]] = [[] for _ in self.attention]
        for i, item in enumerate(scheduler_output.scheduled):
            indices[item.rank].append(i)
        parts = [SchedulerOutput([scheduler_output.scheduled[i] for i in rank_indices],
                                 scheduler_output.finished_request_ids) for rank_indices in indices]
        results = ray.get([w.execute.remote(part) for w, part in zip(self.attention, parts)])
        out = ModelRunnerOutput.empty(len(scheduler_output.scheduled))
        for result, rank_indices in zip(results, indices):
            out.fill_from(result, rank_indices)
        return out

    def stage_times(self) -> dict:
        """Per-layer attention / FFN compute and wait times, and each worker's bubble, since start (worker 0 of
        each kind; `workers` has every worker's raw times)."""
        attention = ray.get([w.stage_times.remote() for w in self.attention])
        ffn = ray.get([w.stage_times.remote() for w in self.ffn])
        return {**summarize(attention[0], ffn[0]), "workers": {"attention": attention, "ffn": ffn}}

    def shutdown(self) -> None:
        try:
            ray.get([w.stop_ffn.remote() for w in self.attention], timeout=30)
        finally:
            for actor in [*self.attention, *self.ffn]:
                ray.kill(actor)
            for handle in self._shm_handles:
                handle.close(unlink=True)
            self._shm_handles = []
