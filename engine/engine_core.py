"""EngineCore: the step loop — schedule, execute, update — over one scheduler, KV manager and executor."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from afdserve.engine.executor import Executor, WorkerFailedError
from afdserve.engine.kv_cache_manager import KVCacheManager
from afdserve.engine.request import Request, RequestStatus
from afdserve.engine.request_cost import CostMeter, RequestCost
from afdserve.engine.sampler import TokenLogprobs
from afdserve.engine.scheduler import Scheduler, SchedulerOutput, SchedulerStats
from afdserve.engine.sla_control import TPOTController
from afdserve.engine.config import EngineConfig
from afdserve.engine.dp_scheduler import DataParallelScheduler
from afdserve.engine.expert_batching import ExpertBatching
from afdserve.kernels.attention.kv_tiers import KVCacheSpec


@dataclass
class EngineCoreOutput:
    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    new_prompt_logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    error: str | None = None  # set with finish_reason "error"
    cost: RequestCost | None = None  # what the request consumed so far (engine/request_cost.py)


class EngineCore:
    def __init__(self, config: EngineConfig, executor: Executor, num_kv_blocks: int, max_model_len: int,
                 kv_spec: KVCacheSpec | None = None, cost_meter: CostMeter | None = None,
                 expert_batching: ExpertBatching | None = None):
        self.config = config
        # One KV cache per attention rank: data-parallel attention (AFD with x > 1 attention workers) has several.
        num_ranks = config.parallel.num_attention_workers if config.parallel.enabled else 1
        self.kv_managers = [KVCacheManager(num_kv_blocks, config.cache.block_size, config.cache.enable_prefix_caching,
                                           kv_spec, config.model.attention_policy_spec) for _ in range(num_ranks)]
        slo_ms = config.scheduler.tpot_slo_ms
        self.sla = TPOTController(slo_ms / 1000) if slo_ms is not None else None  # config refuses it with x > 1
        self.scheduler = (Scheduler(config.scheduler, self.kv_managers[0], max_model_len, sla=self.sla,
                                    expert_batching=expert_batching)
                          if num_ranks == 1 else
                          DataParallelScheduler(config.scheduler, self.kv_managers, max_model_len))
        self.executor = executor
        self.num_steps = 0
        self.cost_meter = cost_meter  # None: requests are not costed
        self.cost_total = RequestCost()  # every chunk computed since start, aborted and recomputed ones included

    @property
    def kv(self) -> KVCacheManager:
        """The KV cache manager of a single-rank engine."""
        if len(self.kv_managers) != 1:
            raise AttributeError("this engine has one KV cache per attention rank: use kv_managers")
        return self.kv_managers[0]

    @property
    def num_free_blocks(self) -> int:
        return sum(kv.num_free_blocks for kv in self.kv_managers)

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        self.scheduler.abort(request_ids)

    def finish_request(self, request_id: str, stop_reason: str) -> None:
        """Ends a request that the front end stopped (a stop string)."""
        request = self.scheduler.requests.get(request_id)
        if request is not None:
            request.stop_reason = stop_reason
            self.scheduler.finish(request, RequestStatus.FINISHED_STOPPED)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def reset_prefix_cache(self) -> None:
        """Drops every prefix-cache entry; refused while requests run (their blocks may be shared)."""
        if self.has_unfinished():
            raise RuntimeError("reset_prefix_cache: requests are still running or waiting")
        for kv in self.kv_managers:
            kv.pool.forget_cached()

    def stats(self) -> SchedulerStats:
        stats = self.scheduler.stats()
        if self.cost_meter is not None:
            stats.cost = replace(self.cost_total)
        stats.expert_cache = self.executor.expert_cache_totals()
        return stats

    def step(self) -> list[EngineCoreOutput]:
        start = time.perf_counter()
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        try:
            result = self.executor.execute(sched)
        except WorkerFailedError as e:  # new workers are up: the step's requests run again on them, once
            return [EngineCoreOutput(r.request_id, finish_reason=r.status.finish_reason, error=str(e),
                                     cost=replace(r.cost) if self.cost_meter is not None else None)
                    for r in self.scheduler.recover_from_worker_failure()]
        requests = [self.scheduler.requests[item.request_id] for item in sched.scheduled]  # before any finishes
        if self.cost_meter is not None:
            self._charge(sched, requests)
        self.scheduler.update_from_output(sched.scheduled, result.sampled)
        self.num_steps += 1
        if self.sla is not None:
            self._observe_step(sched, time.perf_counter() - start)
        outputs = []
        for request, token, logprobs in zip(requests, result.sampled, result.logprobs):
            prompt_logprobs = result.prompt_logprobs.get(request.request_id)
            if token is None and prompt_logprobs is None:
                continue
            outputs.append(EngineCoreOutput(
                request_id=request.request_id,
                new_token_ids=[token] if token is not None else [],
                new_logprobs=[logprobs] if logprobs is not None else [],
                new_prompt_logprobs=prompt_logprobs,
                finish_reason=request.status.finish_reason,
                stop_reason=request.stop_reason,
                num_cached_tokens=max(request.num_cached_tokens, 0),
                cost=replace(request.cost) if self.cost_meter is not None else None,
            ))
        return outputs

    def _charge(self, sched: SchedulerOutput, requests: list[Request]) -> None:
        """Adds each chunk's FLOPs and KV reads to its request and to the engine's total. Logits are computed at
        the chunk's last position, or at each position when the request asks for prompt logprobs."""
        for item, request in zip(sched.scheduled, requests):
            wants_prompt_logprobs = (request.sampling_params.prompt_logprobs is not None
                                     and item.start_pos < request.num_prompt_tokens - 1)
            cost = self.cost_meter.chunk_cost(item.start_pos, item.num_tokens,
                                              item.num_tokens if wants_prompt_logprobs else 1)
            request.cost.add(cost)
            self.cost_total.add(cost)

    def _observe_step(self, sched: SchedulerOutput, seconds: float) -> None:
        """Feeds the step-time model: one-token chunks are decode rows, the rest prompt tokens."""
        decode_rows = sum(1 for item in sched.scheduled if item.num_tokens == 1)
        self.sla.observe(decode_rows, sched.num_tokens - decode_rows, seconds)

    def shutdown(self) -> None:
        self.executor.shutdown()
