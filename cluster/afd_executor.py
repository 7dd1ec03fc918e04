"""AFDExecutor: the executor interface (docs/architecture.md, seam 5) over Ray actors, for any xAyF.

    EngineCore ──execute(SchedulerOutput)──► x AttentionWorkers (each: its requests' KV cache, attention, router,
                                              │                  LM head, sampler)
                                              ⇅ per layer and micro-batch, over the transport (never Ray)
                                             y FFNWorkers (MLP / experts; with y > 1 each holds a shard)

One Ray call per attention worker per step carries its share of the scheduler's output (each scheduled request
names its attention rank: engine/dp_scheduler.py); the per-layer tensors go point-to-point. Ranks on the data plane:
attention workers 0..x-1, FFN workers x..x+y-1.

Placement: Ray places the workers. On a cluster whose nodes advertise the custom resources `afd_attention` or
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
import contextlib
import logging
import os
import pickle
import signal
import threading
import time
import uuid
from pathlib import Path

import ray

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


def init_ray(address: str | None) -> bool:
    """Connects this process to Ray; True if this call started it (the caller then shuts it down)."""
    if ray.is_initialized():
        return False
    if address is None:
        # A private local cluster ("local": never join one that `ray start` left on this host). Actors take no CPU
        # slots, so any xAyF fits on a small host.
        ray.init(address="local", include_dashboard=False, log_to_driver=True, configure_logging=False)
    else:
        ray.init(address=address, log_to_driver=True, configure_logging=False)
    return True


def stop_local_ray() -> None:
    """ray.shutdown() for a cluster this process started, and then its raylet's agents (ray::DashboardAgent,
    ray::RuntimeEnvAgent): started from a thread other than the main one (the engine thread), Ray leaves them
    running after the rest of it has stopped. They are the processes that hold files of this cluster's session
    directory (their logs)."""
    session = ray._private.worker._global_node.get_session_dir_path()
    ray.shutdown()
    left = [pid for pid in _pids_holding(session) if pid != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + (3 if sig == signal.SIGTERM else 0)
        while time.monotonic() < deadline and any(process_alive(pid) for pid in left):
            time.sleep(0.1)
        left = [pid for pid in left if process_alive(pid)]
        if not left:
            return


def _pids_holding(directory: str) -> list[int]:
    """Processes with a file below `directory` open, from /proc (none where there is no /proc)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if any(os.readlink(fd).startswith(directory) for fd in (entry / "fd").iterdir()):
                found.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


def process_alive(pid: int) -> bool:
    """Whether a process exists and has not exited (a zombie has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _role_placement(resource: str) -> dict:
    """Pins a role's workers to the nodes that advertise `resource`, when any does (a tiny share of it, so any
    number of workers fits on such a node)."""
    if any(resource in node["Resources"] for node in ray.nodes() if node["Alive"]):
        return {"resources": {resource: 0.001}}
    return {}


class AFDExecutor:
    def __init__(self, config: EngineConfig, model_dir: Path, model_config: TransformerConfig, num_kv_blocks: int,
                 max_model_len: int):
        par = config.parallel
        # A local cluster started here is stopped by shutdown(), its raylet's agents with it; a joined one stays.
        self._owns_ray = init_ray(par.ray_address)
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
        par = config.parallel
        threads = par.threads_per_worker or max(1, (os.cpu_count() or 2) // (len(self.attention_ranks) +
                                                                            len(self.ffn_ranks)))
        remote_attention = ray.remote(num_cpus=0, **_role_placement("afd_attention"))(AttentionWorker)
        remote_ffn = ray.remote(num_cpus=0, **_role_placement("afd_ffn"))(FFNWorker)
        self.attention = [remote_attention.remote(config, model_dir, model_config, num_kv_blocks, max_model_len,
                                                  rank, threads) for rank in self.attention_ranks]
        self.ffn = [remote_ffn.remote(config, model_dir, model_config, max_model_len, rank, threads, index,
                                      len(self.ffn_ranks)) for index, rank in enumerate(self.ffn_ranks)]
        self._connect(par.afd_transport, config, model_config)
        if len(self.ffn) > 1:  # sharded FFN halves: the FFN workers' own group, for expert-parallel passes
            ip, port = ray.get([self.ffn[0].node_ip.remote(), self.ffn[0].free_port.remote()])
            ray.get([ffn.init_expert_group.remote(ip, port) for ffn in self.ffn])
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
        indices: list[list[int]] = [[] for _ in self.attention]
        for i, item in enumerate(scheduler_output.scheduled):
            indices[item.rank].append(i)
        parts = [SchedulerOutput([scheduler_output.scheduled[i] for i in rank_indices],
                                 scheduler_output.finished_request_ids,
                                 {rank: scheduler_output.kv_moves[rank]} if rank in scheduler_output.kv_moves else {})
                 for rank, rank_indices in enumerate(indices)]
        if all(s.num_tokens == 1 and s.new is None for s in scheduler_output.scheduled):
            self.decode_step_input_bytes.append(sum(len(pickle.dumps(part)) for part in parts))
        results = self._wait_step([w.execute.remote(part) for w, part in zip(self.attention, parts)])
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
        WorkerFailedError with a short message for clients. The full error, Ray's traceback included, goes to the
        log only: it names files, pids, addresses and actor ids."""
        try:
            while True:
                ready, _ = ray.wait(futures, num_returns=len(futures), timeout=HEALTH_CHECK_S)
                if len(ready) == len(futures):
                    return ray.get(futures)
                # A dead attention worker's step is "ready" with its error while the others wait on the FFN side for
                # its micro-batches, forever: raise it now.
                ray.get(ready)
                if not all(ray.get([w.ping.remote() for w in self.ffn], timeout=30)):
                    raise FFNServingStoppedError("an FFN worker's serving thread has stopped")
        except ray.exceptions.RayTaskError as e:  # the worker is alive, its step raised: a bug, not a lost worker
            logger.error("AFD worker step raised (restarting the workers):\n%s", e)
            cause = type(getattr(e, "cause", None) or e).__name__
            self._replace_workers()
            raise WorkerFailedError(f"AFD worker failed: its step raised {cause} (an internal error; the server log "
                                    f"has the traceback); the workers were restarted") from e
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, FFNServingStoppedError) as e:
            logger.error("AFD worker lost during a step (restarting the workers): %s", e)
            self._replace_workers()
            raise WorkerFailedError(f"AFD worker failed: a worker died or stopped answering ({type(e).__name__}); "
                                    f"the workers were restarted") from e

    def _replace_workers(self) -> None:
        logger.error("AFD worker failure: replacing all %d workers", len(self.attention) + len(self.ffn))
        self._stop_workers()
        self.num_restarts += 1
        self._start_workers()

    def _stop_workers(self) -> None:
        with self._stage_times_lock:
            self._stage_times_pending = None
        for actor in [*self.attention, *self.ffn]:
            ray.kill(actor)
        for handle in self._shm_handles:
            handle.close(unlink=True)
        self._shm_handles = []

    def _refresh_stage_times(self, ask: bool = True) -> None:
        """Keeps `latest_stage_times()` at most a second or so old without ever blocking: the request to the
        workers goes out after a step or from a reader, and its answer is picked up by the next of either."""
        with self._stage_times_lock:
            pending = self._stage_times_pending
            if pending is not None and len(ray.wait(pending, num_returns=len(pending), timeout=0)[0]) == len(pending):
                self._stage_times_pending = None
                try:
                    times = ray.get(pending)
                    x = len(self.attention)
                    self._latest_stage_times = summarize(times[0], times[x],
                                                         {"attention": times[:x], "ffn": times[x:]})
                except ray.exceptions.RayError as e:  # the step path replaces a dead worker; keep the last snapshot
                    logger.warning("AFD stage times not fetched (%s); /metrics keeps the last ones", type(e).__name__)
                pending = None
            if ask and pending is None and time.monotonic() - self._stage_times_asked > STAGE_TIMES_REFRESH_S:
                self._stage_times_pending = [w.stage_times.remote() for w in [*self.attention, *self.ffn]]
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

    def stage_times(self) -> dict:
        """Per-layer attention / FFN compute and wait times, and each worker's bubble, since start (worker 0 of
        each kind; `workers` has every worker's raw times)."""
        attention = ray.get([w.stage_times.remote() for w in self.attention])
        ffn = ray.get([w.stage_times.remote() for w in self.ffn])
        return {**summarize(attention[0], ffn[0], {"attention": attention, "ffn": ffn}),
                "workers": {"attention": attention, "ffn": ffn}}

    def worker_weight_bytes(self) -> dict:
        """Parameter bytes each worker holds: attention workers keep the attention side, FFN workers the MLPs /
        experts (their shard, with several)."""
        return {"attention": ray.get([w.weight_bytes.remote() for w in self.attention]),
                "ffn": ray.get([w.weight_bytes.remote() for w in self.ffn])}

    def shutdown(self) -> None:
        try:
            ray.get([w.stop_ffn.remote() for w in self.attention], timeout=30)
        finally:
            self._stop_workers()
            if self._owns_ray:
                stop_local_ray()
