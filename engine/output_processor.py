"""Front-end side of each request: detokenizes, checks stop strings, gathers logprobs, and folds the n children
of a request back into one RequestOutput."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from afdserve.engine.detokenizer import IncrementalDetokenizer
from afdserve.engine.engine_core import EngineCoreOutput
from afdserve.engine.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from afdserve.engine.request_cost import RequestCost, total_cost
from afdserve.engine.sampler import TokenLogprobs
from afdserve.engine.sampling_params import SamplingParams
from afdserve.engine.tokenizer import Tokenizer


@dataclass
class ChildState:
    index: int
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    cost: RequestCost | None = None  # the engine core's latest count for this sample

    def completion(self) -> CompletionOutput:
        delta = self.detokenizer.stream_delta(finished=self.finish_reason is not None)
        return CompletionOutput(self.index, self.detokenizer.output_text, list(self.token_ids),
                                self.cumulative_logprob, self.logprobs, self.finish_reason, self.stop_reason,
                                delta)


@dataclass
class ParentState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    children: list[ChildState]
    arrival_time: float
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0
    error: str | None = None

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.children)


def child_request_id(parent_id: str, index: int, n: int) -> str:
    return parent_id if n == 1 else f"{index}_{parent_id}"


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.parents: dict[str, ParentState] = {}
        self._child_of: dict[str, tuple[ParentState, ChildState]] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, child_params: list[SamplingParams]) -> list[str]:
        """Registers a request and its children; returns the child request ids for the engine core."""
        children = [ChildState(i, IncrementalDetokenizer(self.tokenizer, prompt_token_ids, p))
                    for i, p in enumerate(child_params)]
        parent = ParentState(request_id, prompt, prompt_token_ids, params, children, time.monotonic())
        if params.prompt_logprobs is not None:
            parent.prompt_logprobs = [None]
        self.parents[request_id] = parent
        ids = []
        for child in children:
            cid = child_request_id(request_id, child.index, len(children))
            self._child_of[cid] = (parent, child)
            ids.append(cid)
        return ids

    def process(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[tuple[str, str]]]:
        """Returns the updated requests' outputs and the (child id, stop string) pairs the core must stop."""
        now = time.monotonic()
        updated: dict[str, ParentState] = {}
        stops = []
        for out in outputs:
            found = self._child_of.get(out.request_id)
            if found is None:
                continue
            parent, child = found
            parent.num_cached_tokens = max(parent.num_cached_tokens, out.num_cached_tokens)
            child.cost = out.cost or child.cost
            if out.new_prompt_logprobs and child.index == 0 and parent.prompt_logprobs is not None:
                parent.prompt_logprobs += [self._position_logprobs(lp) for lp in out.new_prompt_logprobs]
            if out.new_token_ids:
                stop = self._add_tokens(child, out, now)
                if stop is not None and child.finish_reason is None:
                    child.finish_reason, child.stop_reason = "stop", stop
                    stops.append((out.request_id, stop))
            if out.finish_reason is not None and child.finish_reason is None:
                child.finish_reason, child.stop_reason = out.finish_reason, out.stop_reason
            parent.error = parent.error or out.error
            updated[parent.request_id] = parent
        results = [self._request_output(p) for p in updated.values()]
        for parent in updated.values():
            if parent.finished:
                self._forget(parent)
        return results, stops

    def abort(self, request_id: str) -> list[str]:
        """Forgets a request; returns its child ids for the core to abort."""
        parent = self.parents.get(request_id)
        if parent is None:
            return []
        ids = [child_request_id(request_id, c.index, len(parent.children)) for c in parent.children]
        self._forget(parent)
        return ids

    def _add_tokens(self, child: ChildState, out: EngineCoreOutput, now: float) -> str | None:
        if child.first_token_time is None:
            child.first_token_time = now
        child.token_times.extend([now] * len(out.new_token_ids))
        child.token_ids.extend(out.new_token_ids)
        if out.new_logprobs:
            child.logprobs = child.logprobs or []
            for lp in out.new_logprobs:
                child.logprobs.append(self._position_logprobs(lp))
                child.cumulative_logprob = (child.cumulative_logprob or 0.0) + lp.logprobs[0]
        return child.detokenizer.update(out.new_token_ids)

    def _position_logprobs(self, lp: TokenLogprobs) -> PositionLogprobs:
        return {tid: Logprob(val, rank, self.tokenizer.decode([tid], skip_special_tokens=False))
                for tid, val, rank in zip(lp.token_ids, lp.logprobs, lp.ranks)}

    def _request_output(self, parent: ParentState) -> RequestOutput:
        first = [c.first_token_time for c in parent.children if c.first_token_time is not None]
        metrics = {"arrival_time": parent.arrival_time, "first_token_time": min(first) if first else None,
                   "token_times": [c.token_times for c in parent.children]}
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids,
                             [c.completion() for c in parent.children], parent.prompt_logprobs, parent.finished,
                             parent.num_cached_tokens, metrics, parent.error,
                             total_cost(c.cost for c in parent.children))

    def _forget(self, parent: ParentState) -> None:
        self.parents.pop(parent.request_id, None)
        for child in parent.children:
            self._child_of.pop(child_request_id(parent.request_id, child.index, len(parent.children)), None)
