"""The engine's per-position logprobs ({token id: Logprob}, the chosen token first, then the top-k) in the two
OpenAI shapes: the legacy completions one (parallel lists with text offsets) and the chat one (a list of objects
with `top_logprobs`)."""
from __future__ import annotations

from collections.abc import Callable

from afdserve.engine.outputs import PositionLogprobs
from afdserve.engine.server.protocol import ChatLogprob, ChatLogprobToken, CompletionLogprobs


def completion_logprobs(token_ids: list[int], positions: list[PositionLogprobs | None],
                        decode_token: Callable[[int], str], text_offset: int = 0) -> CompletionLogprobs:
    """`positions[i]` holds token_ids[i]'s logprob and its position's top-k; None where nothing predicts the
    token (the first prompt token). `top_logprobs` holds the top-k plus the chosen token, as in OpenAI/vLLM."""
    out = CompletionLogprobs()
    for token_id, position in zip(token_ids, positions):
        chosen = position.get(token_id) if position else None
        token = chosen.decoded_token if chosen and chosen.decoded_token is not None else decode_token(token_id)
        out.tokens.append(token)
        out.token_logprobs.append(chosen.logprob if chosen else None)
        out.top_logprobs.append({lp.decoded_token or decode_token(tid): lp.logprob
                                 for tid, lp in position.items()} if position else None)
        out.text_offset.append(text_offset)
        text_offset += len(token)
    return out


def chat_logprobs(token_ids: list[int], positions: list[PositionLogprobs], num_top: int,
                  decode_token: Callable[[int], str]) -> list[ChatLogprobToken]:
    """One entry per sampled token, with the `num_top` most likely tokens at its position."""
    entries = []
    for token_id, position in zip(token_ids, positions):
        chosen = position[token_id]
        ranked = sorted(position.items(), key=lambda item: -item[1].logprob)[:num_top]
        top = [_chat_logprob(tid, lp.logprob, lp.decoded_token, decode_token) for tid, lp in ranked]
        entry = _chat_logprob(token_id, chosen.logprob, chosen.decoded_token, decode_token)
        entries.append(ChatLogprobToken(**entry.model_dump(), top_logprobs=top))
    return entries


def _chat_logprob(token_id: int, logprob: float, decoded: str | None,
                  decode_token: Callable[[int], str]) -> ChatLogprob:
    token = decoded if decoded is not None else decode_token(token_id)
    return ChatLogprob(token=token, logprob=logprob, bytes=list(token.encode("utf-8")))
