"""POST /v1/chat/completions: the conversation through the model's chat template, one engine request
(`chatcmpl-<uuid>`) with n sequences, answered whole or as SSE chunks.

A stream opens each choice with a `{"role": "assistant", "content": ""}` delta when the first token is ready (so
a client's time to first chunk is its time to first token), then sends content deltas, each choice's finish,
the usage chunk when asked for, and `[DONE]`.
"""
from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from afdserve.engine.outputs import CompletionOutput, RequestOutput
from afdserve.engine.server.errors import from_exception
from afdserve.engine.server.logprobs import chat_logprobs
from afdserve.engine.server.protocol import (ChatChoice, ChatChoiceLogprobs, ChatCompletionRequest,
                                             ChatCompletionResponse, ChatCompletionStreamResponse, ChatResponseMessage,
                                             ChatStreamChoice, DeltaMessage, UsageInfo)
from afdserve.engine.server.serving_common import (SSE_DONE, ServingContext, generate_tracked, new_tokens, sse,
                                                   to_sampling_params)


class ChatServing:
    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    async def create(self, request: ChatCompletionRequest) -> ChatCompletionResponse | AsyncIterator[str]:
        """Validates (raising APIError), then returns the whole response, or the SSE stream to send."""
        ctx = self.ctx
        ctx.check_model(request.model)
        messages = [m.to_template_dict() for m in request.messages]
        prompt_ids = await ctx.chat_prompt_ids(messages, request.add_generation_prompt)
        output_field = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        ctx.check_context_length(len(prompt_ids), request.output_limit, "messages", output_field)
        num_top = (request.top_logprobs or 0) if request.logprobs else None
        params = to_sampling_params(request, request.output_limit, logprobs=num_top)
        ctx.check_params(params)
        run = _ChatRun(ctx, request, prompt_ids, f"chatcmpl-{uuid.uuid4().hex}", num_top)
        if request.stream:
            return run.stream(params)
        return await run.collect(params)


class _ChatRun:
    """One chat request in flight: its engine stream and how its outputs become choices."""

    def __init__(self, ctx: ServingContext, request: ChatCompletionRequest, prompt_ids: list[int],
                 request_id: str, num_top: int | None):
        self.ctx = ctx
        self.request = request
        self.prompt_ids = prompt_ids
        self.request_id = request_id
        self.num_top = num_top  # None: no logprobs

    def _generate(self, params) -> AsyncIterator[RequestOutput]:
        return generate_tracked(self.ctx, self.prompt_ids, params, self.request_id)

    async def collect(self, params) -> ChatCompletionResponse:
        final = None
        async with aclosing(self._generate(params)) as outputs:
            async for out in outputs:
                final = out
        choices = [ChatChoice(index=c.index, message=ChatResponseMessage(content=c.text),
                              logprobs=self._logprobs(c, 0), finish_reason=c.finish_reason,
                              stop_reason=c.stop_reason) for c in final.outputs]
        return ChatCompletionResponse(id=self.request_id, model=self.ctx.model_name, choices=choices,
                                      usage=self._usage(final))

    async def stream(self, params) -> AsyncIterator[str]:
        sent_tokens: dict[int, int] = {}  # choice index -> tokens sent; absent until the role delta is sent
        finished: set[int] = set()
        final = None
        try:
            async with aclosing(self._generate(params)) as outputs:
                async for out in outputs:
                    final = out
                    for chunk in self._chunks(out, sent_tokens, finished):
                        yield chunk
            if self.request.include_usage:
                yield sse(ChatCompletionStreamResponse(id=self.request_id, model=self.ctx.model_name, choices=[],
                                                       usage=self._usage(final)))
        except Exception as e:  # the status line is sent: the error goes in the stream
            yield from_exception(e).sse_event()
        yield SSE_DONE

    def _chunks(self, out: RequestOutput, sent_tokens: dict[int, int], finished: set[int]) -> list[str]:
        chunks = []
        for c in out.outputs:
            if c.index not in sent_tokens:
                sent_tokens[c.index] = 0
                chunks.append(self._chunk(ChatStreamChoice(index=c.index,
                                                           delta=DeltaMessage(role="assistant", content=""))))
            start = sent_tokens[c.index]
            if c.index in finished or not (len(c.token_ids) > start or c.text_delta or c.finish_reason):
                continue
            sent_tokens[c.index] = len(c.token_ids)
            if c.finish_reason is not None:
                finished.add(c.index)
            chunks.append(self._chunk(ChatStreamChoice(
                index=c.index, delta=DeltaMessage(content=c.text_delta), logprobs=self._logprobs(c, start),
                finish_reason=c.finish_reason, stop_reason=c.stop_reason)))
        return chunks

    def _chunk(self, choice: ChatStreamChoice) -> str:
        return sse(ChatCompletionStreamResponse(id=self.request_id, model=self.ctx.model_name, choices=[choice]))

    def _logprobs(self, completion: CompletionOutput, start: int) -> ChatChoiceLogprobs | None:
        if self.num_top is None:
            return None
        token_ids, positions = new_tokens(completion.token_ids, completion.logprobs, start)
        return ChatChoiceLogprobs(content=chat_logprobs(token_ids, positions or [], self.num_top,
                                                        self.ctx.decode_token))

    def _usage(self, final: RequestOutput) -> UsageInfo:
        return UsageInfo.of(len(self.prompt_ids), sum(len(c.token_ids) for c in final.outputs), [final.cost])
