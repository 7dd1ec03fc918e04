"""The attention-policy interface, and the per-step object the attention backends call it through."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from afdserve.kernels.attention.sparse.selection import DecodeBatch, PageSelection, SelectedBlocks, selected_blocks


@dataclass(frozen=True)
class KVLayout:
    """The paged KV cache a policy keeps its state beside (state indexed by block id is freed with the block:
    a reused block is rewritten from its first slot, where a policy resets it)."""
    num_layers: int
    num_blocks: int
    page_size: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device


class AttentionPolicy:
    """Decides, per decode sequence, layer and KV head, which pages the query attends to. The defaults: no state,
    every page."""
    name = "dense"

    def allocate(self, layout: KVLayout) -> None:
        """Creates the state kept beside the KV blocks, once, when the runner allocates its cache."""

    def on_write(self, layer: int, k: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Sees each step's new keys ([T, kv_heads, head_dim]) of `layer` after they are stored at `slot_mapping`."""

    def select(self, layer: int, q: torch.Tensor, kv_cache, decodes: DecodeBatch,
               scale: float) -> PageSelection | None:
        """The pages of `layer` the decode queries q [B, heads, head_dim] read; None: every page."""
        return None


@dataclass
class PolicyStep:
    """One step's policy calls, shared by every layer of one micro-batch (decodes.scratch is per micro-batch)."""
    policy: AttentionPolicy
    decodes: DecodeBatch

    def on_write(self, layer: int, k: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        self.policy.on_write(layer, k, slot_mapping)

    def decode_blocks(self, layer: int, q: torch.Tensor, kv_cache, scale: float) -> SelectedBlocks | None:
        """The blocks each decode (sequence, KV head) reads at `layer`, or None when the policy reads every page."""
        selection = self.policy.select(layer, q, kv_cache, self.decodes, scale)
        return None if selection is None else selected_blocks(selection, self.decodes)
