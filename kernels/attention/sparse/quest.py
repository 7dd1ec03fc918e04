"""Quest (Tang et al., ICML 2024): query-aware page selection from per-page key bounds.

Each page keeps, per KV head, the elementwise min and max of its keys. For a query q the page's criticality is
sum_d max(q_d * min_d, q_d * max_d), an upper bound on q . k for every key k in it; the `budget_pages` most critical
pages (and the last page) are read. With GQA one page list serves a KV head's group: its query heads' bounds are
maxed. Quest leaves its first two layers dense, whose attention is not sparse enough to select from.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from afdserve.kernels.attention.sparse.policy import AttentionPolicy, KVLayout, PolicyState
from afdserve.kernels.attention.sparse.selection import DecodeBatch, PageSelection, top_pages
from afdserve.kernels.attention.torch_paged import gather_kv


class KeyBounds(PolicyState):
    """Per layer, KV head and block: the elementwise min and max of the block's keys, in the model dtype."""

    def __init__(self, layout: KVLayout, kv_caches: list):
        self.page_size = layout.page_size
        blocks = torch.arange(layout.num_blocks, device=layout.device)
        self.key_min, self.key_max = [], []
        for layer in range(layout.num_layers):
            # What the cache holds now: unwritten slots of a partly filled block widen its bounds (still bounds).
            keys = gather_kv(kv_caches[layer], blocks)[0].view(layout.kv_heads, layout.num_blocks, layout.page_size,
                                                               layout.head_dim)
            self.key_min.append(keys.amin(2).to(layout.dtype))
            self.key_max.append(keys.amax(2).to(layout.dtype))

    def on_write(self, layer: int, k: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        key_min, key_max = self.key_min[layer], self.key_max[layer]
        blocks = slot_mapping // self.page_size
        # A block's first slot starts its bounds afresh (a freed block comes back through it).
        fresh = blocks[slot_mapping % self.page_size == 0]
        key_min[:, fresh] = float("inf")
        key_max[:, fresh] = float("-inf")
        keys = k.transpose(0, 1).to(key_min.dtype)  # [kv_heads, T, head_dim]
        index = blocks[None, :, None].expand_as(keys)
        key_min.scatter_reduce_(1, index, keys, "amin")
        key_max.scatter_reduce_(1, index, keys, "amax")


@dataclass
class QuestPolicy(AttentionPolicy):
    budget_pages: int = 64  # pages read per (sequence, KV head): 1,024 tokens at 16 a page
    dense_layers: int = 2  # the first layers read every page
    name = "quest"
    state_type = KeyBounds

    def __post_init__(self) -> None:
        if self.budget_pages < 1:
            raise ValueError(f"quest: budget_pages must be >= 1, got {self.budget_pages}")
        if self.dense_layers < 0:
            raise ValueError(f"quest: dense_layers must be >= 0, got {self.dense_layers}")

    def bind(self, layout: KVLayout, state: KeyBounds) -> None:
        self.bounds = state

    def select(self, layer: int, q: torch.Tensor, kv_cache, decodes: DecodeBatch,
               scale: float) -> PageSelection | None:
        if layer < self.dense_layers:
            return None
        return top_pages(self.criticality(layer, q, decodes), self.budget_pages, decodes)

    def criticality(self, layer: int, q: torch.Tensor, decodes: DecodeBatch) -> torch.Tensor:
        """[B, kv_heads, max_pages]: max over each KV head's query heads of sum_d max(q_d min_d, q_d max_d),
        computed as q+ . max + q- . min."""
        num_seqs, num_heads, head_dim = q.shape
        key_min, key_max = self.bounds.key_min[layer], self.bounds.key_max[layer]
        kv_heads = key_min.shape[0]
        tables = decodes.block_tables
        key_min = key_min[:, tables].permute(1, 0, 3, 2).float()  # [B, kv_heads, head_dim, max_pages]
        key_max = key_max[:, tables].permute(1, 0, 3, 2).float()
        grouped = q.float().view(num_seqs, kv_heads, num_heads // kv_heads, head_dim)
        bound = grouped.clamp(min=0) @ key_max + grouped.clamp(max=0) @ key_min  # [B, kv_heads, group, max_pages]
        return bound.amax(dim=2)
