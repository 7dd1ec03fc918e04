"""A request's state inside the engine: its tokens, how many of them have KV computed, and its status.

Each counter changes in one place: `num_computed_tokens`, `num_sent_tokens` and `num_sent_blocks` in
Scheduler._grant (advance) and Scheduler._preempt (reset); `output_token_ids` in Scheduler.update_from_output.
"""
from __future__ import annotations

import enum
import time

from afdserve.engine.request_cost import RequestCost
from afdserve.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"  # a worker died under it (AFD); the request's KV was lost with the worker

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED,
                        RequestStatus.FINISHED_ERROR)

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.finished else None


class Request:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: frozenset[int] = frozenset(),
        max_tokens: int | None = None,
        arrival_time: float | None = None,
    ):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids
        # The effective output limit: the user's max_tokens, capped by the context length (the engine sets it).
        self.max_tokens = max_tokens if max_tokens is not None else sampling_params.max_tokens
        self.arrival_time = arrival_time if arrival_time is not None else time.monotonic()
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0
        # How many tokens and blocks the executor holds for this request: a step sends only what lies beyond.
        self.num_sent_tokens = 0
        self.num_sent_blocks = 0
        self.num_cached_tokens = -1  # prefix-cache hit length at first scheduling; -1 until then
        self.num_preemptions = 0
        self.decode_steps_held = 0  # consecutive steps it was ready to decode and expert batching held it back
        self.num_worker_failures = 0  # AFD worker failures it was running at (Scheduler.recover_from_worker_failure)
        self.cost = RequestCost()  # FLOPs and KV reads of every chunk computed for it (EngineCore charges them)
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.value}, prompt={self.num_prompt_tokens}, "
                f"out={self.num_output_tokens}, computed={self.num_computed_tokens})")
