"""Turns the last-position logits of a step into tokens: logit bias, penalties, temperature, top-k/top-p/min-p,
sampling.

Greedy rows take the argmax. Random rows draw with the exponential race (argmax of p / Exp(1) noise), with a
per-request torch.Generator when the request has a seed, so its tokens do not depend on the rest of the batch.
Logprobs are those of the model's raw distribution, as in vLLM.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from afdserve.engine.request_state import RequestState
from afdserve.engine.sampling_params import SamplingParams


@dataclass
class TokenLogprobs:
    """Logprobs at one position: the chosen token first, then the top-k (which may repeat it)."""
    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]


def apply_logit_bias(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """One row of logits [V] plus OpenAI's logit_bias (token id -> bias), before penalties as in vLLM."""
    ids = torch.tensor(list(params.logit_bias), dtype=torch.long, device=logits.device)
    logits[ids] += torch.tensor(list(params.logit_bias.values()), dtype=logits.dtype, device=logits.device)
    return logits


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int],
                    output_ids: list[int]) -> torch.Tensor:
    """One row of logits [V]. Repetition penalty over prompt and output; frequency/presence over the output."""
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long, device=logits.device)
        if len(seen):
            vals = logits[seen]
            p = params.repetition_penalty
            logits[seen] = torch.where(vals > 0, vals / p, vals * p)
    if (params.frequency_penalty or params.presence_penalty) and output_ids:
        counts = torch.bincount(torch.tensor(output_ids, dtype=torch.long, device=logits.device),
                                minlength=logits.shape[-1]).to(logits)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits)
    return logits


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """One row [V] after temperature, top-k, top-p and min-p: dropped tokens at -inf."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p: a token is dropped if the mass before it already does.
        drop_sorted = (probs.cumsum(-1) - probs) >= params.top_p
        drop_sorted[0] = False
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), float("-inf"))
    if params.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def _top_logprobs(logprobs: torch.Tensor, token: int, k: int) -> TokenLogprobs:
    chosen = logprobs[token]
    rank = int((logprobs > chosen).sum()) + 1
    ids, lps, ranks = [token], [float(chosen)], [rank]
    if k:
        top = torch.topk(logprobs, k)
        ids += top.indices.tolist()
        lps += top.values.tolist()
        ranks += list(range(1, k + 1))
    return TokenLogprobs(ids, lps, ranks)


class Sampler:
    def __call__(self, logits: torch.Tensor, requests: list[RequestState],
                 generators: list[torch.Generator | None]) -> tuple[list[int], list[TokenLogprobs | None]]:
        """logits: [B, V] float32, one row per request."""
        want_logprobs = [r.sampling_params.logprobs is not None for r in requests]
        raw_logprobs = logits.log_softmax(-1) if any(want_logprobs) else None
        tokens = logits.argmax(-1).tolist()
        for i, request in enumerate(requests):
            params = request.sampling_params
            needs_min_tokens = request.num_output_tokens < params.min_tokens
            if params.greedy and not params.changes_logits and not needs_min_tokens:
                continue
            row = logits[i].clone()
            if params.logit_bias:
                row = apply_logit_bias(row, params)
            if params.uses_penalties:
                row = apply_penalties(row, params, request.prompt_token_ids, request.output_token_ids)
            if needs_min_tokens:
                banned = list(params.stop_token_ids) + ([] if params.ignore_eos else list(request.eos_token_ids))
                if banned:
                    row[torch.tensor(banned, dtype=torch.long, device=row.device)] = float("-inf")
            if params.greedy:
                tokens[i] = int(row.argmax())
                continue
            probs = filter_logits(row, params).softmax(-1)
            noise = torch.empty_like(probs).exponential_(generator=generators[i])
            tokens[i] = int((probs / noise).argmax())
        logprobs = [
            _top_logprobs(raw_logprobs[i], tokens[i], r.sampling_params.logprobs) if want_logprobs[i] else None
            for i, r in enumerate(requests)
        ]
        return tokens, logprobs


def prompt_logprobs_for_chunk(logits: torch.Tensor, next_token_ids: list[int], k: int) -> list[TokenLogprobs]:
    """logits [n, V] at chunk positions; next_token_ids[j] is the prompt token that position j predicts."""
    logprobs = logits.log_softmax(-1)
    return [_top_logprobs(logprobs[j], tok, k) for j, tok in enumerate(next_token_ids)]
