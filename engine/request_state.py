"""What an executor keeps of each request between steps, rebuilt from the scheduler's plain-data messages.

The scheduler sends a request whole once (`NewRequestData`: prompt, sampling params, and after a preemption the
tokens sampled so far) and then, per step, only the tokens and block ids added since (`ScheduledRequest`). This
module applies those messages, so the model runner (in this process, or in an AFD attention worker) sees every
token and block of the requests it runs without a live `Request` object crossing the seam.
"""
from __future__ import annotations

import torch

from afdserve.engine.sampling_params import SamplingParams
from afdserve.engine.scheduler import NewRequestData, ScheduledRequest, SchedulerOutput


class RequestState:
    """One request as an executor knows it: its tokens, its KV blocks, and the sampler's per-request state."""

    def __init__(self, new: NewRequestData):
        self.request_id = new.request_id
        self.prompt_token_ids = new.prompt_token_ids
        self.output_token_ids = list(new.output_token_ids)
        self.sampling_params: SamplingParams = new.sampling_params
        self.eos_token_ids = new.eos_token_ids
        self.block_ids: list[int] = []
        self.generator: torch.Generator | None = None  # made on first use, for a request with a seed
        self.num_prompt_logprobs_sent = 0  # prompt positions whose logprobs were returned already
        self.policy_state: dict = {}  # an attention policy's choices for this request (SparseD's pages)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def token_ids(self, start: int, count: int) -> list[int]:
        """Tokens [start, start + count) of prompt + output, without building the whole sequence."""
        prompt = self.prompt_token_ids
        head = prompt[start:start + count]
        if len(head) == count:
            return head
        first_output = max(start - len(prompt), 0)
        return head + self.output_token_ids[first_output:first_output + count - len(head)]


class RequestStates:
    """request id -> RequestState, kept in step with the scheduler by `update` once per step."""

    def __init__(self):
        self._states: dict[str, RequestState] = {}

    def __getitem__(self, request_id: str) -> RequestState:
        return self._states[request_id]

    def update(self, sched: SchedulerOutput) -> None:
        for request_id in sched.finished_request_ids:
            self._states.pop(request_id, None)
        for item in sched.scheduled:
            self._apply(item)

    def _apply(self, item: ScheduledRequest) -> None:
        if item.new is not None:
            state = RequestState(item.new)
            resumed = self._states.get(item.request_id)
            if resumed is not None:  # after a preemption: new blocks, but the seeded stream and the prompt
                state.generator = resumed.generator  # logprobs already returned carry on
                state.num_prompt_logprobs_sent = resumed.num_prompt_logprobs_sent
            self._states[item.request_id] = state
        state = self._states[item.request_id]
        state.output_token_ids += item.new_token_ids  # the prompt came whole: what follows are sampled tokens
        state.block_ids += item.new_block_ids
        if item.start_pos + item.num_tokens > state.num_tokens:  # a message was lost or applied twice
            raise RuntimeError(f"request {item.request_id}: the step computes tokens up to "
                               f"{item.start_pos + item.num_tokens}, but the executor knows {state.num_tokens}")
