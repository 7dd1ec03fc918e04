"""Which KV pages a decode query reads: the seam between attention policies and the paged attention backends.

A policy (kernels/attention/sparse/) picks, for each decode sequence and KV head, some of the sequence's logical
pages — always its last, partly filled page, which holds the query's own token — and optionally a log-weight per
page that is added to the logits of the page's tokens (an importance-sampling correction). `selected_blocks` turns
the choice into what the paged decode reads for every policy, on both backends: per (sequence, KV head) a block table
of its own, its length in tokens, and the log-weights. The kept pages are listed in ascending order, so the last page
comes last and only it is partial: sequence b, head h reads (counts[b, h] - 1) * page + (tokens on the last page)
tokens. Dense attention is every page with no weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch


@dataclass
class DecodeBatch:
    """What a policy sees of one step's decodes (one query token per sequence)."""
    block_tables: torch.Tensor  # [B, max_pages] long: physical block of each logical page, padded with 0
    seq_lens: torch.Tensor  # [B] long: tokens with KV, the query's own included
    page_size: int
    seeds: torch.Tensor  # [B] long: each request's sampling seed (0 without one), for seeded policies
    scratch: dict = field(default_factory=dict)  # state a policy passes from one layer to the next within the step
    # Per sequence: how many decodes it ran before this one, and a dict the policy may keep choices in across steps
    # (engine/request_state.RequestState.policy_state, dropped with the request).
    decode_steps: list[int] = field(default_factory=list)
    request_states: list[dict] = field(default_factory=list)

    @property
    def num_pages(self) -> torch.Tensor:
        """[B] long: pages each sequence fills."""
        return (self.seq_lens + self.page_size - 1) // self.page_size

    def valid_pages(self) -> torch.Tensor:
        """[B, max_pages] bool: pages that hold tokens."""
        return torch.arange(self.block_tables.shape[1], device=self.seq_lens.device)[None, :] < self.num_pages[:, None]


class PageSelection(NamedTuple):
    pages: torch.Tensor  # [B, kv_heads, k] long: kept logical pages, ascending; entries at and past counts: padding
    counts: torch.Tensor  # [B, kv_heads] long: pages kept, >= 1 (the last page always is)
    log_weights: torch.Tensor | None = None  # [B, kv_heads, k] float, added to the logits of each kept page's tokens


def top_pages(scores: torch.Tensor, budget: int, decodes: DecodeBatch) -> PageSelection:
    """The `budget` highest-scoring pages per row of scores [B, kv_heads, max_pages] (a page scored +inf is always
    kept; a page past the sequence is never), plus the last page, ascending."""
    valid = decodes.valid_pages()[:, None, :]
    scores = scores.float().masked_fill(last_page_mask(decodes)[:, None, :], float("inf"))
    scores = scores.masked_fill(~valid, float("-inf"))
    top, index = scores.topk(min(budget, scores.shape[-1]), dim=-1)
    kept = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return compact(kept.scatter_(2, index, top > float("-inf")))


def last_page_mask(decodes: DecodeBatch) -> torch.Tensor:
    """[B, max_pages] bool: each sequence's last page, the one its query token is on."""
    page = torch.arange(decodes.block_tables.shape[1], device=decodes.seq_lens.device)
    return page[None, :] == decodes.num_pages[:, None] - 1


def compact(kept: torch.Tensor, log_weights: torch.Tensor | None = None) -> PageSelection:
    """The True pages of kept [B, kv_heads, max_pages] as ascending lists, as wide as the longest; log_weights
    [B, kv_heads, max_pages], if given, taken at the kept pages."""
    max_pages = kept.shape[-1]
    page = torch.arange(max_pages, device=kept.device)
    counts = kept.sum(-1)
    width = max(int(counts.max()), 1) if counts.numel() else 1
    pages = torch.where(kept, page, max_pages).sort(dim=-1).values[..., :width]  # padding (max_pages) sorts last
    pages = pages.masked_fill(pages == max_pages, 0)
    weights = None if log_weights is None else log_weights.gather(-1, pages)
    return PageSelection(pages, counts, weights)


class SelectedBlocks(NamedTuple):
    """A selection as the paged decode reads it: each (sequence, KV head) a sequence of its own."""
    block_tables: torch.Tensor  # [B, kv_heads, k] long: physical blocks of the kept pages, in order
    seq_lens: torch.Tensor  # [B, kv_heads] long: tokens read through them (only the last block is partial)
    log_weights: torch.Tensor | None  # [B, kv_heads, k] float, added to the logits of each block's tokens


def selected_blocks(selection: PageSelection, decodes: DecodeBatch) -> SelectedBlocks:
    pages, counts, log_weights = selection
    num_seqs, kv_heads, k = pages.shape
    tables = decodes.block_tables.gather(1, pages.reshape(num_seqs, -1)).view(num_seqs, kv_heads, k)
    last_tokens = decodes.seq_lens - (decodes.num_pages - 1) * decodes.page_size  # [B], 1..page
    return SelectedBlocks(tables, (counts - 1) * decodes.page_size + last_tokens[:, None], log_weights)


def selected_mask_bias(blocks: SelectedBlocks, page_size: int) -> torch.Tensor:
    """[B, kv_heads, k * page] float for decode_attention: each kept token's page log-weight (or 0), -inf past
    the kept tokens."""
    tables, seq_lens, log_weights = blocks
    position = torch.arange(tables.shape[-1] * page_size, device=tables.device)
    bias = torch.zeros(*tables.shape[:2], position.shape[0], device=tables.device)
    if log_weights is not None:
        bias += log_weights.float().repeat_interleave(page_size, dim=-1)
    return bias.masked_fill_(position >= seq_lens[..., None], float("-inf"))
