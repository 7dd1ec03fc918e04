"""Probabilistic FlashAttention (Li, arXiv 2410.18441), in our reading of its abstract: pages take part in a
query's attention with a probability that falls with their distance from the query's own page.

The paper gives no formula; ours: the query's page and the `window_pages` - 1 before it always take part, and so
does the first page (the attention sink) with keep_sink; a page at distance d from the query's page (d = 0 for it)
otherwise takes part with probability p(d) = min(1, c / (d + 1)), the harmonic fall-off, where c is solved per
sequence so that the expected number of pages is `budget_pages`. The draw is seeded by (request seed, layer, step,
KV head, page), the step being the sequence's length, so a run is reproducible whatever it is batched with. Softmax
runs over the drawn pages; with reweight each page's logits also get log(1 / p(d)), the Horvitz-Thompson weight.
One draw serves a KV head's query heads.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from afdserve.kernels.attention.sparse.policy import AttentionPolicy, KVLayout
from afdserve.kernels.attention.sparse.selection import DecodeBatch, PageSelection, compact

_MASK32 = 0xFFFFFFFF
_BISECTION_STEPS = 40


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32's shape; multipliers below 2^31 keep the products inside int64)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _MASK32
    return x ^ (x >> 16)


def seeded_uniform(seeds: torch.Tensor, layer: int, steps: torch.Tensor, kv_heads: int,
                   max_pages: int) -> torch.Tensor:
    """[B, kv_heads, max_pages] numbers in [0, 1), a pure function of (seed, layer, step, head, page)."""
    device = seeds.device
    x = _mix32(_mix32(seeds & _MASK32) ^ layer)
    x = _mix32(x ^ (steps & _MASK32))[:, None, None]
    x = _mix32(x ^ torch.arange(kv_heads, device=device)[None, :, None])
    x = _mix32(x ^ torch.arange(max_pages, device=device)[None, None, :])
    return x.double().div(2.0 ** 32).float()


def harmonic_scale(distance: torch.Tensor, free: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B] c with sum over free pages of min(1, c / (distance + 1)) = target (bisection; c = number of pages when
    the target covers them all). distance, free: [B, max_pages]; target: [B]."""
    hi = torch.full(target.shape, float(distance.shape[1] + 1), device=target.device)
    lo = torch.zeros_like(hi)
    inv = 1.0 / (distance.float() + 1)
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        expected = ((mid[:, None] * inv).clamp(max=1) * free).sum(-1)
        below = expected < target
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return hi


@dataclass
class PrFlashPolicy(AttentionPolicy):
    budget_pages: float = 64.0  # expected pages read per (sequence, KV head)
    window_pages: int = 1  # the query's page and the ones before it, always read
    keep_sink: bool = True  # the first page, always read
    reweight: bool = False  # add log(1 / p) to a drawn page's logits
    seed: int = 0  # mixed into every draw
    name = "prflash"

    def __post_init__(self) -> None:
        if self.budget_pages < 1:
            raise ValueError(f"prflash: budget_pages must be >= 1, got {self.budget_pages}")
        if self.window_pages < 1:
            raise ValueError(f"prflash: window_pages must be >= 1 (the query's own page), got {self.window_pages}")

    def bind(self, layout: KVLayout, state: None) -> None:
        self.kv_heads = layout.kv_heads

    def probabilities(self, decodes: DecodeBatch) -> torch.Tensor:
        """[B, max_pages]: each page's chance to be read at this step (1 for the forced ones, 0 past the end)."""
        page = torch.arange(decodes.block_tables.shape[1], device=decodes.seq_lens.device)[None, :]
        distance = decodes.num_pages[:, None] - 1 - page
        valid = distance >= 0
        forced = valid & (distance < self.window_pages)
        if self.keep_sink:
            forced |= page == 0
        free = valid & ~forced
        target = (self.budget_pages - forced.sum(-1)).clamp(min=0).float()
        c = harmonic_scale(distance.clamp(min=0), free, target)
        p = (c[:, None] / (distance.clamp(min=0) + 1)).clamp(max=1)
        return torch.where(forced, 1.0, torch.where(free, p, 0.0))

    def select(self, layer: int, q: torch.Tensor, kv_cache, decodes: DecodeBatch,
               scale: float) -> PageSelection | None:
        if "prflash" not in decodes.scratch:  # the same for every layer of the step
            decodes.scratch["prflash"] = self.probabilities(decodes)
        p = decodes.scratch["prflash"][:, None, :]
        draw = seeded_uniform(decodes.seeds + self.seed, layer, decodes.seq_lens, self.kv_heads, p.shape[-1])
        kept = draw < p
        return compact(kept, -p.log().expand_as(kept) if self.reweight else None)
