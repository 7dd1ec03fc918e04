"""What the engine returns: per-token logprobs and per-request outputs, shaped like vLLM's."""
from __future__ import annotations

from dataclasses import dataclass, field

from afdserve.engine.request_cost import RequestCost


@dataclass
class Logprob:
    logprob: float
    rank: int  # 1 = the most likely token
    decoded_token: str | None = None


# For each position: token id -> its logprob (the sampled/prompt token first, then the top-k).
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    # Text that is safe to stream since the previous output: never a prefix of a stop string that may still
    # complete (all of the rest once finished). Concatenated over a request's outputs it equals `text`.
    text_delta: str = ""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: list[PositionLogprobs | None] | None = None  # None for the first prompt token
    finished: bool = False
    num_cached_tokens: int = 0
    metrics: dict = field(default_factory=dict)
    error: str | None = None  # why a sequence finished with "error" (the server answers 503 with it)
    cost: RequestCost | None = None  # FLOPs, KV bytes read and eFLOPs, all samples together (request_cost.py)
