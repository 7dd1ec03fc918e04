"""Scheduler in the style of vLLM v1: one token budget per step, running requests first, then waiting ones.

Each step every scheduled request is granted some tokens so that its computed tokens catch up with its known
tokens: a decode gets 1, a prefill gets as many as the budget allows (chunked prefill), a prefix hit skips ahead.
When blocks run out, the newest running request is preempted (recompute): its blocks are freed, its progress reset,
and it goes to the front of the waiting queue. The scheduler holds no tensors: its output is plain data.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from afdserve.engine.config import SchedulerConfig
from afdserve.engine.expert_batching import ExpertBatching
from afdserve.engine.kv_cache_manager import KVCacheManager
from afdserve.engine.kv_staircase import StairMove
from afdserve.engine.request import Request, RequestStatus
from afdserve.engine.request_cost import RequestCost
from afdserve.engine.sampling_params import SamplingParams
from afdserve.engine.sla_control import NO_LIMITS, SLAStats, TPOTController
from afdserve.models.layers.expert_cache import ExpertCacheTotals


@dataclass
class NewRequestData:
    """What an executor learns of a request once: when it is first scheduled, and again when it resumes after a
    preemption (its KV was freed, so the executor replaces what it kept)."""
    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # tokens sampled before a preemption; empty for a request scheduled the first time
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]


@dataclass
class ScheduledRequest:
    """One request's share of a step, as plain data: what crosses to the executor and the AFD attention workers.

    The executor keeps each request's tokens and block ids between steps (engine/request_state.py), so a running
    request carries only what is new since it was last scheduled: the token sampled last step and the blocks
    allocated since. The message does not grow with the context."""
    request_id: str
    start_pos: int  # tokens before this chunk already have KV
    num_tokens: int  # tokens in this chunk
    new_token_ids: list[int]  # tokens appended since the executor last saw the request (all in `new` when set)
    new_block_ids: list[int]  # blocks allocated since the executor last saw the request
    samples: bool  # the chunk reaches the end of the known tokens, so the step produces the next token
    rank: int = 0  # the attention rank whose KV cache holds the request (data-parallel attention)
    new: NewRequestData | None = None  # set the first time, and after a preemption


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    finished_request_ids: set[str] = field(default_factory=set)  # since the last step: executors drop their state
    # int4 / saq: per attention rank, the staircase moves its runner replays before the step writes (kv_staircase)
    kv_moves: dict[int, list[StairMove]] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_usage: float
    num_preemptions: int
    prefix_queries: int
    prefix_hits: int
    sla: SLAStats | None = None  # with a TPOT SLO (--tpot-slo-ms)
    cost: RequestCost | None = None  # all chunks computed since start (the engine core fills it in)
    expert_cache: ExpertCacheTotals | None = None  # --expert-cache-size (the engine core fills it in)


MAX_WORKER_FAILURES = 1  # failed steps a request may be in and still be retried on new workers


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int, rank: int = 0,
                 sla: TPOTController | None = None, expert_batching: ExpertBatching | None = None):
        self.config = config
        self.sla = sla
        self.expert_batching = expert_batching  # --expert-batch-size: which ready decodes run together
        self.kv = kv
        self.rank = rank
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self._finished_ids: set[str] = set()

    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- schedule -------------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        # With a TPOT SLO, the step-time model caps the batch and the prompt tokens beside the decodes.
        limits = self.sla.limits(self._num_decoding()) if self.sla is not None else NO_LIMITS
        prefill_budget = limits.prefill_tokens if limits.prefill_tokens is not None else budget
        preemptions_before = self.num_preemptions
        held = self._held_decodes()
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            remaining = request.num_tokens - request.num_computed_tokens
            num_new = min(remaining, budget) if remaining == 1 else min(remaining, budget, prefill_budget)
            if request.request_id in held:
                num_new = 0
            if num_new == 0:  # held back this step (the SLO's or expert batching's): it keeps its blocks
                i += 1
                continue
            if not self._allocate_or_preempt(request, num_new):
                break  # the request itself was preempted: everything after it was too
            out.scheduled.append(self._grant(request, num_new))
            budget -= num_new
            if remaining > 1:
                prefill_budget -= num_new
            i += 1
        preempted = self.num_preemptions > preemptions_before
        max_running = min(self.max_running, limits.max_seqs or self.max_running)
        # Admit waiting requests only when nothing was preempted this step, so a preempted request is not
        # immediately re-admitted and thrashed.
        while (self.waiting and budget > 0 and prefill_budget > 0 and len(self.running) < max_running
               and not preempted):
            request = self.waiting[0]
            prefix = self.kv.find_prefix(request)
            num_new = min(request.num_tokens - prefix.num_tokens, budget, prefill_budget)
            if not self.kv.allocate_slots(request, num_new, prefix):
                break
            self.waiting.popleft()
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = prefix.num_tokens
            request.num_computed_tokens = prefix.num_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(self._grant(request, num_new))
            budget -= num_new
            prefill_budget -= num_new
        if self.sla is not None and self.waiting and budget > 0 and not preempted and (
                prefill_budget <= 0 or self.max_running > len(self.running) >= max_running):
            self.sla.note_held()
        out.finished_request_ids, self._finished_ids = self._finished_ids, set()
        moves = self.kv.take_stair_moves()
        if moves:
            out.kv_moves[self.rank] = moves
        return out

    def _held_decodes(self) -> set[str]:
        """Expert batching's choice for this step: the ready decodes it holds back (each one's count of steps
        held, which the aging bound reads, is kept here)."""
        if self.expert_batching is None:
            return set()
        decodes = [r for r in self.running if r.num_tokens - r.num_computed_tokens == 1]
        held = self.expert_batching.held(decodes)
        for request in decodes:
            request.decode_steps_held = request.decode_steps_held + 1 if request.request_id in held else 0
        return held

    def _num_decoding(self) -> int:
        return sum(1 for r in self.running if r.num_tokens - r.num_computed_tokens == 1)

    @property
    def max_running(self) -> int:
        """max_num_seqs, or fewer when the KV format's staircase pools hold fewer sequences' windows."""
        return min(self.config.max_num_seqs, self.kv.max_running_seqs or self.config.max_num_seqs)

    def _allocate_or_preempt(self, request: Request, num_new: int) -> bool:
        """Allocates for a running request, preempting the newest running ones until it fits."""
        while not self.kv.allocate_slots(request, num_new):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.num_sent_tokens = request.num_sent_blocks = 0  # its executor state is stale: send it anew
        request.num_preemptions += 1
        request.status = RequestStatus.PREEMPTED
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _grant(self, request: Request, num_new: int) -> ScheduledRequest:
        block_ids = self.kv.block_ids(request.request_id)
        new = None
        if request.num_sent_tokens == 0:  # never sent, or resumed after a preemption
            new = NewRequestData(request.request_id, list(request.prompt_token_ids),
                                 list(request.output_token_ids), request.sampling_params, request.eos_token_ids)
        scheduled = ScheduledRequest(
            request.request_id, request.num_computed_tokens, num_new,
            new_token_ids=[] if new else request.all_token_ids[request.num_sent_tokens:],
            new_block_ids=block_ids[request.num_sent_blocks:],
            samples=request.num_computed_tokens + num_new == request.num_tokens, rank=self.rank, new=new)
        request.num_computed_tokens += num_new
        request.num_sent_tokens = request.num_tokens
        request.num_sent_blocks = len(block_ids)
        return scheduled

    # ---- update ---------------------------------------------------------------------------------------------
    def update_from_output(self, scheduled: list[ScheduledRequest], sampled: list[int | None]) -> list[Request]:
        """Appends each sampled token and finishes requests on EOS, stop token ids or length.

        `sampled[i]` is None for a chunk that did not reach the end of its prompt. Returns the requests that
        received a token this step."""
        updated = []
        for item, token in zip(scheduled, sampled):
            request = self.requests.get(item.request_id)
            if token is None or request is None or request.status is not RequestStatus.RUNNING:
                continue
            request.append_output_token(token)
            updated.append(request)
            reason = self._check_stop(request, token)
            if reason is not None:
                self.finish(request, reason)
        return updated

    def _check_stop(self, request: Request, token: int) -> RequestStatus | None:
        params = request.sampling_params
        if request.num_output_tokens >= request.max_tokens or request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        if request.num_output_tokens < params.min_tokens:
            return None
        if not params.ignore_eos and token in request.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if token in params.stop_token_ids:
            request.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        return None

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Ends a request (also used for aborts and stop strings) and returns its blocks to the pool."""
        if request.status.finished:
            return
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status = status
        self.kv.free(request)
        self.requests.pop(request.request_id, None)
        self._finished_ids.add(request.request_id)

    def recover_from_worker_failure(self) -> list[Request]:
        """After the workers holding the KV were replaced (AFD): every running request goes back to the waiting queue
        to recompute its KV on the new workers, as after a preemption (its tokens so far are kept, so a stream goes
        on where it was), and the prefix cache is forgotten. A request that was running at an earlier failure too
        ends with FINISHED_ERROR instead, so a request that makes workers fail cannot restart them forever. Returns
        those."""
        failed = []
        for request in reversed(list(self.running)):  # preempting puts each in front: the oldest ends up first
            request.num_worker_failures += 1
            if request.num_worker_failures > MAX_WORKER_FAILURES:
                self.finish(request, RequestStatus.FINISHED_ERROR)
                failed.append(request)
            else:
                self._preempt(request)
        self.kv.forget_all()
        return failed[::-1]

    def abort(self, request_ids: list[str]) -> list[Request]:
        aborted = []
        for rid in request_ids:
            request = self.requests.get(rid)
            if request is not None:
                self.finish(request, RequestStatus.FINISHED_ABORTED)
                aborted.append(request)
        return aborted

    def stats(self) -> SchedulerStats:
        return SchedulerStats(len(self.running), len(self.waiting), self.kv.usage, self.num_preemptions,
                              self.kv.prefix_queries, self.kv.prefix_hits,
                              self.sla.stats() if self.sla is not None else None)
