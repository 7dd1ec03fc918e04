"""POST /v1/completions: prompts (a string, strings, token ids, lists of token ids) x n choices.

Each prompt is one engine request (`cmpl-<uuid>-<i>`) carrying all n of its sequences; choice index =
prompt index * n + sequence index, as in vLLM. With `echo`, the prompt's text (and, with `logprobs`, its
prompt logprobs) precedes the generated text; `echo` with `max_tokens=0` returns the prompt alone, which is how
evaluation harnesses score a text's likelihood.
"""
from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from afdserve.engine.outputs import CompletionOutput, RequestOutput
from afdserve.engine.server.errors import APIError, from_exception
from afdserve.engine.server.logprobs import completion_logprobs
from afdserve.engine.server.protocol import (CompletionChoice, CompletionRequest, CompletionResponse,
                                             CompletionStreamResponse, UsageInfo)
from afdserve.engine.server.serving_common import (SSE_DONE, ServingContext, generate_tracked, merge_streams,
                                                   new_tokens, sse, to_sampling_params)


@dataclass
class Prompt:
    token_ids: list[int]
    text: str | None  # None for token-id prompts until echo needs it


@dataclass
class _ChoiceProgress:
    """What a streamed choice has sent so far."""
    num_tokens: int = 0
    num_chars: int = 0  # for logprobs' text_offset
    started: bool = False
    finished: bool = False


class CompletionServing:
    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    async def create(self, request: CompletionRequest) -> CompletionResponse | AsyncIterator[str]:
        """Validates (raising APIError), then returns the whole response, or the SSE stream to send."""
        ctx = self.ctx
        ctx.check_model(request.model)
        prompts = await self._prompts(request)
        echo_only = request.echo and request.max_tokens == 0
        max_tokens = 1 if echo_only else request.max_tokens  # echo-only runs one step for the prompt logprobs
        for prompt in prompts:
            ctx.check_context_length(len(prompt.token_ids), max_tokens, "prompt")
        prompt_logprobs = request.logprobs if request.echo else None
        params = to_sampling_params(request, max_tokens, logprobs=request.logprobs, prompt_logprobs=prompt_logprobs)
        ctx.check_params(params)
        run = _CompletionRun(ctx, request, prompts, f"cmpl-{uuid.uuid4().hex}", echo_only)
        if request.stream:
            return run.stream(params)
        return await run.collect(params)

    async def _prompts(self, request: CompletionRequest) -> list[Prompt]:
        prompt = request.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise APIError("prompt must not be empty", 400, "prompt")
        out = []
        for item in prompt:
            if isinstance(item, str):
                out.append(Prompt(await self.ctx.encode(item, "prompt", request.add_special_tokens), item))
            else:
                self.ctx.check_token_ids(item, "prompt")
                out.append(Prompt(list(item), None))
        return out


class _CompletionRun:
    """One completions request in flight: its engine streams and how their outputs become choices."""

    def __init__(self, ctx: ServingContext, request: CompletionRequest, prompts: list[Prompt], request_id: str,
                 echo_only: bool):
        self.ctx = ctx
        self.request = request
        self.prompts = prompts
        self.request_id = request_id
        self.echo_only = echo_only

    def _streams(self, params) -> list[AsyncIterator[RequestOutput]]:
        return [generate_tracked(self.ctx, p.token_ids, params, f"{self.request_id}-{i}")
                for i, p in enumerate(self.prompts)]

    async def collect(self, params) -> CompletionResponse:
        final: dict[int, RequestOutput] = {}
        async with aclosing(merge_streams(self._streams(params))) as outputs:
            async for i, out in outputs:
                final[i] = out
        choices = []
        for i, prompt in enumerate(self.prompts):
            for completion in final[i].outputs:
                choices.append(self._choice(i, prompt, final[i], completion, _ChoiceProgress()))
        return CompletionResponse(id=self.request_id, model=self.ctx.model_name, choices=choices,
                                  usage=self._usage(final))

    async def stream(self, params) -> AsyncIterator[str]:
        progress: dict[int, _ChoiceProgress] = {}  # by choice index
        final: dict[int, RequestOutput] = {}  # by prompt index
        try:
            async with aclosing(merge_streams(self._streams(params))) as outputs:
                async for i, out in outputs:
                    final[i] = out
                    for choice in self._new_choices(i, out, progress):
                        yield sse(CompletionStreamResponse(id=self.request_id, model=self.ctx.model_name,
                                                           choices=[choice]))
            if self.request.include_usage:
                yield sse(CompletionStreamResponse(id=self.request_id, model=self.ctx.model_name, choices=[],
                                                   usage=self._usage(final)))
        except Exception as e:  # the status line is sent: the error goes in the stream
            yield from_exception(e).sse_event()
        yield SSE_DONE

    def _new_choices(self, prompt_index: int, out: RequestOutput,
                     progress: dict[int, _ChoiceProgress]) -> list[CompletionChoice]:
        """A chunk's choice for every sequence of `out` with new text, tokens or a finish."""
        choices = []
        for completion in out.outputs:
            state = progress.setdefault(self._index(prompt_index, completion), _ChoiceProgress())
            has_news = len(completion.token_ids) > state.num_tokens or completion.text_delta or completion.finish_reason
            if has_news and not state.finished:
                choices.append(self._choice(prompt_index, self.prompts[prompt_index], out, completion, state))
        return choices

    def _index(self, prompt_index: int, completion: CompletionOutput) -> int:
        return prompt_index * self.request.n + completion.index

    def _choice(self, prompt_index: int, prompt: Prompt, out: RequestOutput, completion: CompletionOutput,
                state: _ChoiceProgress) -> CompletionChoice:
        """The choice's text and logprobs since `state` (everything for a fresh state), advancing `state`."""
        token_ids, positions = new_tokens(completion.token_ids, completion.logprobs, state.num_tokens)
        state.num_tokens += len(token_ids)
        text = completion.text_delta if self.request.stream else completion.text
        if self.echo_only:  # the one generated token only served to compute the prompt's logprobs
            token_ids, positions, text = [], [], ""
        if self.request.echo and not state.started:
            text = self._prompt_text(prompt) + text
            positions = self._prompt_positions(prompt, out) + (positions or [])
            token_ids = prompt.token_ids + token_ids
        logprobs = None
        if self.request.logprobs is not None:
            logprobs = completion_logprobs(token_ids, positions, self.ctx.decode_token, state.num_chars)
        state.started = True
        state.num_chars += len(text)
        state.finished = completion.finish_reason is not None
        return CompletionChoice(index=self._index(prompt_index, completion), text=text, logprobs=logprobs,
                                finish_reason=completion.finish_reason, stop_reason=completion.stop_reason)

    def _prompt_text(self, prompt: Prompt) -> str:
        if prompt.text is None:
            prompt.text = self.ctx.tokenizer.decode(prompt.token_ids, skip_special_tokens=False)
        return prompt.text

    def _prompt_positions(self, prompt: Prompt, out: RequestOutput) -> list:
        if self.request.logprobs is None or out.prompt_logprobs is None:
            return [None] * len(prompt.token_ids)
        return list(out.prompt_logprobs[:len(prompt.token_ids)])

    def _usage(self, final: dict[int, RequestOutput]) -> UsageInfo:
        prompt_tokens = sum(len(p.token_ids) for p in self.prompts)
        completion_tokens = 0 if self.echo_only else sum(
            len(c.token_ids) for out in final.values() for c in out.outputs)
        return UsageInfo.of(prompt_tokens, completion_tokens, [out.cost for out in final.values()])
