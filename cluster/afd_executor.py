"""AFDExecutor: the executor interface (docs/architecture.md, seam 5) over AFD workers, for any xAyF.

    EngineCore ──execute(SchedulerOutput)──► x AttentionWorkers (each: its requests' KV cache, attention, router,
                                              │                  LM head, sampler)
                                              ⇅ per layer and micro-batch, over the transport (never the actors' calls)
                                             y FFNWorkers (MLP / experts; with y > 1 each holds a shard)

The workers are Ray actors or local processes (`--distributed-executor-backend ray|mp`, cluster/actors.py). One call
per attention worker per step carries its share of the scheduler's output (each scheduled request names its attention
rank: engine/dp_scheduler.py); the per-layer tensors go point-to-point. Ranks on the data plane: attention workers
0..x-1, FFN workers x..x+y-1. On a GPU host the workers are local processes on the configured GPU, or on GPU `rank`
each when there are x + y GPUs (worker_config), which the NCCL transport needs.

Placement on Ray: Ray places the workers. On a cluster whose nodes advertise the custom resources `afd_attention` or
`afd_ffn` (`ray start ... --resources '{"afd_ffn": 1}'`), workers of that role go only to those nodes, which is how
attention and FFN workers land on separate machines (README, "AFD across Ray nodes").

Faults: while a step runs, the FFN workers are pinged every `HEALTH_CHECK_S` (their serving loop has its own
thread, so a live one answers at once; an attention worker's death fails its step's future directly). A dead or
failed worker makes the step raise WorkerFailedError after every worker has been replaced: the attention workers
are replaced too, since they are blocked mid-step on the dead peer and their KV caches are now inconsistent. The
scheduler then sends the step's requests again, to recompute their KV on the new workers
(Scheduler.recover_from_worker_failure).
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import pickle
import threading
import time
import uuid
from pathlib import Path

import torch

from afdserve.cluster.actors import WorkerLostError, WorkerRaisedError, make_actors
from afdserve.cluster.attention_worker import AttentionWorker
from afdserve.cluster.ffn_worker import FFNWorker
from afdserve.cluster.stage_timer import summarize
from afdserve.cluster.transport import create_shm_channels
from afdserve.engine.config import EngineConfig
from afdserve.engine.executor import WorkerFailedError
from afdserve.engine.model_runner import ModelRunnerOutput
from afdserve.engine.scheduler import SchedulerOutput
from afdserve.models.hf_config import TransformerConfig
from afdserve.models.layers.expert_cache import ExpertCacheTotals

logger = logging.getLogger(__name__)
HEALTH_CHECK_S = 1.0
STAGE_TIMES_REFRESH_S = 1.0  # how often /metrics' AFD stage times are fetched from the workers


class FFNServingStoppedError(RuntimeError):
    """An FFN worker answers pings but its serving thread is gone: it will never finish the step."""


class AFDExecutor:
    def __init__(self, config: EngineConfig, model_dir: Path, model_config: TransformerConfig, num_kv_blocks: int,
                 max_model_len: int):
        par = config.parallel
        self.actors = make_actors(par.distributed_executor_backend, par.ray_address)
        self._worker_args = (config, model_dir, model_config, num_kv_blocks, max_model_len)
        self.attention_ranks = list(range(par.num_attention_workers))
        self.ffn_ranks = list(range(par.num_attention_workers, par.num_attention_workers + par.num_ffn_workers))
        self.num_restarts = 0
        # Bytes of the step messages to the attention workers (pickled, as Ray sends them), per pure decode step.
        self.decode_step_input_bytes: collections.deque[int] = collections.deque(maxlen=100_000)
        self._shm_handles = []
        self._latest_stage_times: dict | None = None
        self._stage_times_pending: list | None = None
        self._stage_times_asked = 0.0
        self._stage_times_lock = threading.Lock()  # the engine thread refreshes, /metrics reads
        self._start_workers()

    def _start_workers(self) -> None:
        config, model_dir, model_config, num_kv_blocks, max_model_len = self._worker_args
        par, start = config.parallel, self.actors.start
        threads = par.threads_per_worker or max(1, (os.cpu_count() or 2) // (len(self.attention_ranks) +
                                                                            len(self.ffn_ranks)))
        self.attention = [start(AttentionWorker, worker_config(config, rank), model_dir, model_config, num_kv_blocks,
                                max_model_len, rank, threads, role="afd_attention") for rank in self.attention_ranks]
        self.ffn = [start(FFNWorker, worker_config(config, rank), model_dir, model_config, max_model_len, rank,
                          threads, index, len(self.ffn_ranks), role="afd_ffn")
                    for index, rank in enumerate(self.ffn_ranks)]
        self._connect(par.afd_transport, config, model_config)
        if len(self.ffn) > 1:  # sharded FFN halves: the FFN workers' own group, for expert-parallel passes
            host, port = self.actors.host(self.ffn[0]), self._call_all(self.ffn[:1], "free_port")[0]
            self._call_all(self.ffn, "init_expert_group", host, port)
        self._call_all(self.ffn, "start", self.attention_ranks)

    def _connect(self, kind: str, config: EngineConfig, model_config: TransformerConfig) -> None:
        call = self.actors.call
        if kind in ("gloo", "nccl"):
            host = self.actors.host(self.attention[0])
            port = self._call_all(self.attention[:1], "free_port")[0]
            common = dict(world_size=len(self.attention) + len(self.ffn), init_method=f"tcp://{host}:{port}")
        else:
            # One slot per micro-batch in flight; a slot holds the largest message: a full step's tokens x hidden.
            tokens = config.scheduler.max_num_batched_tokens
            slot_bytes = tokens * model_config.hidden_size * 4
            pairs = [p for a in self.attention_ranks for f in self.ffn_ranks for p in ((a, f), (f, a))]
            channels, self._shm_handles = create_shm_channels(pairs, config.parallel.micro_batches + 1, slot_bytes,
                                                              f"afd-{uuid.uuid4().hex[:8]}")
            common = dict(channels=channels)
        self.actors.get([call(w, "init_transport", kind, self.ffn_ranks, **common) for w in self.attention] +
                        [call(w, "init_transport", kind, **common) for w in self.ffn])

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Every attention worker runs every step, an idle one too: the FFN workers serve all ranks in lockstep."""
        indices: list[list[int]] = [[] for _ in self.attention]
        for i, item in enumerate(scheduler_output.scheduled):
            indices[item.rank].append(i)
        parts = [SchedulerOutput([scheduler_output.scheduled[i] for i in rank_indices],
                                 scheduler_output.finished_request_ids,
                                 {rank: scheduler_output.kv_moves[rank]} if rank in scheduler_output.kv_moves else {})
                 for rank, rank_indices in enumerate(indices)]
        if all(s.num_tokens == 1 and s.new is None for s in scheduler_output.scheduled):
            self.decode_step_input_bytes.append(sum(len(pickle.dumps(part)) for part in parts))
        results = self._wait_step([self.actors.call(w, "execute", part) for w, part in zip(self.attention, parts)])
        self._refresh_stage_times()
        if len(results) == 1:
            return results[0]
        out = ModelRunnerOutput.empty(len(scheduler_output.scheduled))
        for result, rank_indices in zip(results, indices):
            out.fill_from(result, rank_indices)
        return out

    def _wait_step(self, futures: list) -> list[ModelRunnerOutput]:
        """The step's results; a lost worker or an exception in a worker's step restarts every worker (the other
        side of the pipeline is left mid-layer, and only fresh workers resynchronize the data plane) and raises
        WorkerFailedError with a short message for clients. The full error, the worker's traceback included, goes
        to the log only: it names files, pids, addresses and actor ids."""
        actors = self.actors
        try:
            while True:
                ready = actors.ready(futures, timeout=HEALTH_CHECK_S)
                if len(ready) == len(futures):
                    return actors.get(futures)
                # A dead attention worker's step is "ready" with its error while the others wait on the FFN side for
                # its micro-batches, forever: raise it now.
                actors.get(ready)
                if not all(self._call_all(self.ffn, "ping", timeout=30)):
                    raise FFNServingStoppedError("an FFN worker's serving thread has stopped")
        except WorkerRaisedError as e:  # the worker is alive, its step raised: a bug, not a lost worker
            logger.error("AFD worker step raised (restarting the workers):\n%s", e.detail)
            self._replace_workers()
            raise WorkerFailedError(f"AFD worker failed: its step raised {e.cause} (an internal error; the server "
                                    f"log has the traceback); the workers were restarted") from e
        except (WorkerLostError, FFNServingStoppedError) as e:
            logger.error("AFD worker lost during a step (restarting the workers): %s", e)
            self._replace_workers()
            raise WorkerFailedError(f"AFD worker failed: a worker died or stopped answering ({_lost_reason(e)}); "
                                    f"the workers were restarted") from e

    def _replace_workers(self) -> None:
        logger.error("AFD worker failure: replacing all %d workers", len(self.attention) + len(self.ffn))
        self._stop_workers()
        self.num_restarts += 1
        self._start_workers()

    def _stop_workers(self) -> None:
        with self._stage_times_lock:
            self._stage_times_pending = None
        for worker in [*self.attention, *self.ffn]:
            self.actors.kill(worker)
        for handle in self._shm_handles:
            handle.close(unlink=True)
        self._shm_handles = []

    def _refresh_stage_times(self, ask: bool = True) -> None:
        """Keeps `latest_stage_times()` at most a second or so old without ever blocking: the request to the
        workers goes out after a step or from a reader, and its answer is picked up by the next of either."""
        actors = self.actors
        with self._stage_times_lock:
            pending = self._stage_times_pending
            if pending is not None and len(actors.ready(pending, timeout=0)) == len(pending):
                self._stage_times_pending = None
                try:
                    times = actors.get(pending)
                    x = len(self.attention)
                    self._latest_stage_times = summarize(times[0], times[x],
                                                         {"attention": times[:x], "ffn": times[x:]})
                except (WorkerRaisedError, WorkerLostError) as e:  # the step path replaces a dead worker
                    logger.warning("AFD stage times not fetched (%s); /metrics keeps the last ones", type(e).__name__)
                pending = None
            if ask and pending is None and time.monotonic() - self._stage_times_asked > STAGE_TIMES_REFRESH_S:
                self._stage_times_pending = [actors.call(w, "stage_times") for w in [*self.attention, *self.ffn]]
                self._stage_times_asked = time.monotonic()

    def expert_cache_totals(self) -> ExpertCacheTotals | None:
        """From the latest stage-times snapshot of FFN worker 0 (an expert cache runs with one FFN worker only)."""
        times = self.latest_stage_times()
        cache = None if times is None else times.get("expert_cache")
        return None if cache is None else ExpertCacheTotals(**cache)

    def latest_stage_times(self) -> dict | None:
        """The last fetched `stage_times()` summary (None before the first step): cheap, for /metrics. It also asks
        for a newer one when due, so that an idle server's snapshot catches up with its last steps."""
        self._refresh_stage_times()
        return self._latest_stage_times

    def _call_all(self, workers: list, method: str, *args, timeout: float | None = None) -> list:
        """`method(*args)` on every worker at once; their results in order."""
        return self.actors.get([self.actors.call(w, method, *args) for w in workers], timeout=timeout)

    def stage_times(self) -> dict:
        """Per-layer attention / FFN compute and wait times, and each worker's bubble, since start (worker 0 of
        each kind; `workers` has every worker's raw times)."""
        attention, ffn = self._call_all(self.attention, "stage_times"), self._call_all(self.ffn, "stage_times")
        return {**summarize(attention[0], ffn[0], {"attention": attention, "ffn": ffn}),
                "workers": {"attention": attention, "ffn": ffn}}

    def worker_weight_bytes(self) -> dict:
        """Parameter bytes each worker holds: attention workers keep the attention side, FFN workers the MLPs /
        experts (their shard, with several)."""
        return {"attention": self._call_all(self.attention, "weight_bytes"),
                "ffn": self._call_all(self.ffn, "weight_bytes")}

    def shutdown(self) -> None:
        try:
            self._call_all(self.attention, "stop_ffn", timeout=30)
        finally:
            self._stop_workers()
            self.actors.shutdown()


def worker_config(config: EngineConfig, rank: int) -> EngineConfig:
    """The config a worker runs with: on a host with a GPU per worker (`device` cuda, x + y GPUs or more), worker
    `rank` gets GPU `rank`; otherwise every worker uses the configured device (one GPU shared, or the CPU)."""
    device = config.model.device
    workers = config.parallel.num_attention_workers + config.parallel.num_ffn_workers
    if device != "cuda" or torch.cuda.device_count() < workers:
        return config
    return dataclasses.replace(config, model=dataclasses.replace(config.model, device=f"cuda:{rank}"))


def _lost_reason(e: Exception) -> str:
    """What a client may read about a lost worker: the kind of failure, never a pid, address or actor id."""
    return type(e).__name__ if isinstance(e, FFNServingStoppedError) else str(e)
