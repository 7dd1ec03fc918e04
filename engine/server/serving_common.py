"""What completions and chat completions share: the model check, request fields -> SamplingParams, the context
length check, the engine stream with its metrics, merging several prompts' streams, and SSE framing."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from pydantic import BaseModel

from afdserve.engine.async_engine import AsyncEngine, RequestFailedError
from afdserve.engine.outputs import RequestOutput
from afdserve.engine.sampling_params import SamplingParams
from afdserve.engine.server.errors import APIError, from_value_error, model_not_found
from afdserve.engine.server.metrics import ServerMetrics
from afdserve.engine.server.protocol import SamplingRequest
from afdserve.engine.server.server_args import DEFAULT_MAX_REQUEST_BYTES

SSE_DONE = "data: [DONE]\n\n"


@dataclass
class ServingContext:
    """What every endpoint handler needs: the engine, the name clients use for the model, the metrics, and the
    engine requests in flight (so that a drain can abort them)."""
    engine: AsyncEngine
    model_name: str
    metrics: ServerMetrics
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # HTTP bodies and gRPC messages (--max-request-bytes)
    inflight: set[str] = field(default_factory=set)  # engine request ids being generated

    def abort_inflight(self) -> int:
        """Aborts every request in flight (a drain that ran out of time); their streams end with an error."""
        for request_id in list(self.inflight):
            self.engine.abort(request_id)
        return len(self.inflight)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def check_model(self, requested: str | None) -> None:
        if requested is not None and requested != self.model_name:
            raise model_not_found(requested)

    def check_token_ids(self, token_ids: list[int], field: str) -> None:
        try:
            self.engine.engine.check_token_ids(token_ids, field)
        except ValueError as e:
            raise APIError(str(e), 400, field) from None

    def check_params(self, params: SamplingParams) -> None:
        """The engine's checks of sampling parameters against the model, as a 400 naming the field."""
        try:
            self.engine.engine.check_params(params)
        except ValueError as e:
            raise from_value_error(e) from None

    def check_context_length(self, num_prompt_tokens: int, max_tokens: int | None, field: str,
                             output_field: str = "max_tokens") -> None:
        """400 when the prompt plus the requested output does not fit the context (vLLM's rule and message); the
        error names the output field when the output alone cannot fit, else the prompt's."""
        limit = self.engine.max_model_len
        if num_prompt_tokens == 0:
            raise APIError(f"{field} must not be empty", 400, field)
        if num_prompt_tokens >= limit:
            raise APIError(f"This model's maximum context length is {limit} tokens. However, the {field} has "
                           f"{num_prompt_tokens} tokens, which leaves no room for output. Please reduce the length "
                           f"of the {field}.", 400, field)
        if max_tokens is not None and num_prompt_tokens + max_tokens > limit:
            raise APIError(f"This model's maximum context length is {limit} tokens. However, you requested "
                           f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the {field}, "
                           f"{max_tokens} in the completion). Please reduce the length of the {field} or "
                           f"completion.", 400, output_field if max_tokens >= limit else field)

    async def encode(self, text: str, field: str, add_special_tokens: bool = True) -> list[int]:
        """The text's token ids for a prompt; a text that cannot fit the context whatever its tokens is refused
        before it is tokenized (a 10 MB prompt takes seconds)."""
        limit = self.engine.max_model_len
        at_least = len(text) // (2 * self.tokenizer.max_token_bytes)  # half the bound: normalizers may shrink text
        if at_least >= limit:
            raise APIError(f"This model's maximum context length is {limit} tokens. However, the {field} has "
                           f"{len(text)} characters, at least {at_least} tokens. Please reduce the length of the "
                           f"{field}.", 400, field)
        return await self.tokenize(text, field, add_special_tokens)

    async def tokenize(self, text: str, field: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids, computed on a worker thread: the event loop (every other stream, /health) never waits for a
        long text, and neither does the engine thread."""
        try:
            return await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens)
        except ValueError as e:
            raise APIError(str(e), 400, field) from None

    def decode_token(self, token_id: int) -> str:
        return self.engine.tokenizer.decode([token_id], skip_special_tokens=False)

    async def chat_prompt_ids(self, messages: list[dict], add_generation_prompt: bool,
                              check_length: bool = True) -> list[int]:
        """The conversation through the model's chat template, as the offline LLM.chat tokenizes it."""
        try:
            text = await asyncio.to_thread(self.tokenizer.apply_chat_template, messages,
                                           add_generation_prompt=add_generation_prompt)
        except ValueError as e:
            raise APIError(str(e), 400, "messages") from None
        encode = self.encode if check_length else self.tokenize
        return await encode(text, "messages", add_special_tokens=False)


def to_sampling_params(request: SamplingRequest, max_tokens: int | None, logprobs: int | None = None,
                       prompt_logprobs: int | None = None) -> SamplingParams:
    """Unset request fields keep SamplingParams' defaults (the OpenAI ones); a bad value is a 400 naming it."""
    optional = {name: getattr(request, name) for name in
                ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
                 "repetition_penalty") if getattr(request, name) is not None}
    try:
        return SamplingParams(
            n=request.n, max_tokens=max_tokens, min_tokens=request.min_tokens, stop=request.stop or [],
            stop_token_ids=request.stop_token_ids or [], ignore_eos=request.ignore_eos,
            skip_special_tokens=request.skip_special_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            logit_bias=_token_keyed(request.logit_bias), attention_policy=request.attention_policy, **optional)
    except (ValueError, TypeError) as e:
        raise from_value_error(ValueError(str(e))) from None


def _token_keyed(logit_bias: dict[str, float] | None) -> dict[int, float]:
    """OpenAI sends logit_bias keyed by token ids written as strings."""
    out = {}
    for key, bias in (logit_bias or {}).items():
        try:
            out[int(key)] = bias
        except ValueError:
            raise ValueError(f"logit_bias keys must be token ids (integers as strings), got {key!r}") from None
    return out


async def generate_tracked(ctx: ServingContext, prompt_ids: list[int], params: SamplingParams,
                           request_id: str) -> AsyncIterator[RequestOutput]:
    """The engine's stream for one prompt, recording the request in the metrics when it finishes or is aborted.

    The finish is recorded before the last output is handed on, so a client that hangs up after the last token
    is not counted as an abort. Rejected input (ValueError before any output) is neither."""
    last: RequestOutput | None = None
    accounted = False  # recorded as finished, or rejected before it began
    ctx.inflight.add(request_id)
    try:
        async with aclosing(ctx.engine.generate(prompt_ids, params, request_id)) as stream:
            async for out in stream:
                last = out
                if out.finished:
                    ctx.metrics.record_finished(out)
                    accounted = True
                yield out
    except ValueError:
        accounted = accounted or last is None
        raise
    except RequestFailedError as e:
        ctx.metrics.record_finished(e.output)  # counted under finished_reason="error"
        accounted = True
        raise
    finally:
        ctx.inflight.discard(request_id)
        if not accounted:
            ctx.metrics.record_aborted(last, len(prompt_ids))


async def merge_streams(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """Items of several async iterators as they come, tagged with the iterator's index. Closing the merge (or an
    error in one stream) closes every stream, which aborts their engine requests."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:
            async for item in only:
                yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator) -> None:
        try:
            async with aclosing(stream):
                async for item in stream:
                    queue.put_nowait((index, item))
        except Exception as e:  # handed to the consumer, which raises it
            queue.put_nowait((index, e))
        finally:
            queue.put_nowait((index, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


def new_tokens(token_ids: list[int], logprobs: list | None, start: int) -> tuple[list[int], list | None]:
    """Tokens (and their logprobs) from `start` on. The logprobs list grows on the engine thread while the output
    is in flight, so it is cut at this output's token count, never at its own length."""
    end = len(token_ids)
    return token_ids[start:end], (logprobs[start:end] if logprobs is not None else None)
