"""MoE expert compute in plain torch, batched per expert (the CPU path).

    topk_ids [T, k] ──flatten──► T*k (token, slot) copies ──stable sort by expert──► permutation
    x[token of each copy] ──► rows grouped by expert: expert e owns rows offsets[e]:offsets[e+1]
    per expert that received rows:  h = rows @ w13[e]^T  ──►  silu(h[:, :I]) * h[:, I:]  ──►  @ w2[e]^T
    combine: out[token] += topk_weights[copy] * row   (index_add, fp32, then cast to x's dtype)

Weights: w13 [E, 2I, H] (gate rows, then up rows) and w2 [E, H, I], the layout of vLLM's fused_moe and of
transformers' fused experts. The loop runs over experts with tokens (never over tokens); its row counts are read on
the host once per call (one sync), which is fine for the CPU path. The stable sort keeps each expert's rows in token
order, so the result does not depend on sort internals. Tokens per expert come back with the output: the per-step
load statistic for balancing and for the AFD planner.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class ExpertPermutation(NamedTuple):
    order: torch.Tensor  # [T*k] flat (token, slot) indices, grouped by expert, token order within an expert
    token_idx: torch.Tensor  # [T*k] the token of each permuted row (order // k)
    tokens_per_expert: torch.Tensor  # [E] int64
    expert_offsets: torch.Tensor  # [E+1] int64, rows of expert e are expert_offsets[e]:expert_offsets[e+1]


def permute_by_expert(topk_ids: torch.Tensor, num_experts: int) -> ExpertPermutation:
    flat = topk_ids.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return ExpertPermutation(order, order // topk_ids.shape[1], counts, offsets)


def fused_experts_torch(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                        topk_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] -> (out [T, H] in x's dtype, tokens_per_expert [E]); see the module docstring.

    An id of E (one past the last expert) means "an expert another FFN worker holds" (expert parallelism): those
    copies sort last and are skipped, so they contribute nothing here."""
    num_experts = w13.shape[0]
    perm = permute_by_expert(topk_ids, num_experts + 1)
    bounds = perm.expert_offsets.tolist()
    here = bounds[num_experts]  # copies routed to this worker's experts
    token_idx = perm.token_idx[:here]
    rows = x.index_select(0, token_idx)
    out_rows = torch.empty_like(rows)
    for e in range(num_experts):
        start, end = bounds[e], bounds[e + 1]
        if start == end:
            continue
        gate, up = F.linear(rows[start:end], w13[e]).chunk(2, dim=-1)
        out_rows[start:end] = F.linear(F.silu(gate) * up, w2[e])
    weights = topk_weights.reshape(-1).index_select(0, perm.order[:here]).float()
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    out.index_add_(0, token_idx, out_rows.float() * weights.unsqueeze(-1))
    return out.to(x.dtype), perm.tokens_per_expert[:num_experts]
