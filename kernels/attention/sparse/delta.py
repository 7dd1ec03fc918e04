"""DELTA (Entezari Zarch et al., ACL 2026): layer-aware page selection for long decodes.

Layers come in three kinds. Full layers read every page. A full layer whose next layer is not full is a selection
(Δ) layer: from its full attention it scores each page as the sum over the page's tokens of the max over all query
heads of the softmax probability, and keeps the `budget_pages` best, the last `recent_pages` always, ties going to
the older page. Every other layer is sparse and reads the pages its nearest preceding Δ-layer chose, one list for
all KV heads. The selection is made anew at every step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from afdserve.kernels.attention.sparse.policy import AttentionPolicy, KVLayout
from afdserve.kernels.attention.sparse.selection import DecodeBatch, PageSelection, top_pages
from afdserve.kernels.attention.torch_paged import decode_mask_bias, gather_kv

TIE_BREAK = 1e-7  # per page index, so that equal scores keep the older page


def default_full_layers(num_layers: int) -> tuple[int, ...]:
    """The paper's layers 0, 1, 2, 14 and 22 of 28, scaled to the depth: three first layers, then halfway and
    eleven-fourteenths of the way."""
    return tuple(sorted({0, 1, 2, round(num_layers * 14 / 28), round(num_layers * 22 / 28)} & set(range(num_layers))))


@dataclass
class DeltaPolicy(AttentionPolicy):
    budget_pages: int = 64  # pages a sparse layer reads: 1,024 tokens at 16 a page
    recent_pages: int = 8  # the newest pages, always kept
    full_layers: tuple[int, ...] | None = None  # None: default_full_layers(depth)
    name = "delta"

    def __post_init__(self) -> None:
        if self.budget_pages < 1:
            raise ValueError(f"delta: budget_pages must be >= 1, got {self.budget_pages}")
        if not 0 <= self.recent_pages <= self.budget_pages:
            raise ValueError(f"delta: recent_pages must be in [0, budget_pages], got {self.recent_pages}")
        if self.full_layers is not None:
            self.full_layers = tuple(sorted(set(self.full_layers)))
            if not self.full_layers or self.full_layers[0] != 0 or any(i < 0 for i in self.full_layers):
                raise ValueError(f"delta: full_layers must include layer 0 (the first selection needs full layers "
                                 f"before it), got {list(self.full_layers)}")

    def bind(self, layout: KVLayout, state: None) -> None:
        if self.full_layers is None:
            self.full_layers = default_full_layers(layout.num_layers)
        if self.full_layers[-1] >= layout.num_layers:
            raise ValueError(f"delta: full_layers {list(self.full_layers)} name a layer the model (of "
                             f"{layout.num_layers}) does not have")
        self.kv_heads = layout.kv_heads
        full = set(self.full_layers)
        self.selection_layers = frozenset(i for i in full if i + 1 not in full)

    def select(self, layer: int, q: torch.Tensor, kv_cache, decodes: DecodeBatch,
               scale: float) -> PageSelection | None:
        if layer in self.selection_layers:
            decodes.scratch["delta"] = self.choose(q, kv_cache, decodes, scale)
        if layer in self.full_layers:
            return None
        return decodes.scratch["delta"]

    def choose(self, q: torch.Tensor, kv_cache, decodes: DecodeBatch, scale: float) -> PageSelection:
        scores = self.page_scores(q, kv_cache, decodes, scale)  # [B, max_pages]
        page = torch.arange(scores.shape[1], device=scores.device)
        recent = page[None, :] >= decodes.num_pages[:, None] - self.recent_pages
        scores = scores.masked_fill(recent, float("inf")) - TIE_BREAK * page
        pages, counts, _ = top_pages(scores[:, None, :], self.budget_pages, decodes)  # one list for all heads
        return PageSelection(pages.expand(-1, self.kv_heads, -1), counts.expand(-1, self.kv_heads))

    @staticmethod
    def page_scores(q: torch.Tensor, kv_cache, decodes: DecodeBatch, scale: float) -> torch.Tensor:
        """[B, max_pages]: per page, the sum over its tokens of the max over query heads of the softmax
        probability of the full attention (a second pass over the keys, DELTA's engine mapping)."""
        token_scores = attention_probabilities(q, kv_cache, decodes, scale).amax(dim=(1, 2))  # [B, L]
        return token_scores.view(q.shape[0], -1, decodes.page_size).sum(-1)


def attention_probabilities(q: torch.Tensor, kv_cache, decodes: DecodeBatch, scale: float) -> torch.Tensor:
    """[B, kv_heads, group, max_pages * page]: full attention's softmax probabilities of each query head over
    every token of its sequence (0 past the end), from a pass over the gathered keys."""
    num_seqs, num_heads, head_dim = q.shape
    keys = gather_kv(kv_cache, decodes.block_tables.reshape(-1))[0]  # [kv_heads, B * max_pages * page, hd]
    kv_heads = keys.shape[0]
    keys = keys.view(kv_heads, num_seqs, -1, head_dim).transpose(0, 1).float()  # [B, kv_heads, L, hd]
    grouped = q.float().view(num_seqs, kv_heads, num_heads // kv_heads, head_dim)
    logits = grouped @ keys.transpose(-1, -2) * scale  # [B, kv_heads, group, L]
    mask = decode_mask_bias(decodes.seq_lens, keys.shape[2])  # [B, 1, L]
    return torch.softmax(logits + mask[:, :, None, :], dim=-1)
