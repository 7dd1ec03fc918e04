"""The attention-policy interface, the state a kind of policy keeps beside the KV blocks, the table of policies a
runner serves, and the per-step object the attention backends call them through."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from afdserve.kernels.attention.sparse.selection import DecodeBatch, PageSelection, SelectedBlocks, selected_blocks


@dataclass(frozen=True)
class KVLayout:
    """The paged KV cache a policy keeps its state beside."""
    num_layers: int
    num_blocks: int
    page_size: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device


class PolicyState:
    """State indexed by block id, shared by every policy of a kind whatever its parameters, and kept current with
    every step's writes from its creation. It is freed with its blocks: a reused block is rewritten from its first
    slot, where the state starts afresh."""

    def __init__(self, layout: KVLayout, kv_caches: list):
        """Built from what kv_caches hold already (blocks written before any request asked for this kind)."""

    def on_write(self, layer: int, k: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Sees each step's new keys ([T, kv_heads, head_dim]) of `layer` after they are stored at `slot_mapping`."""


class AttentionPolicy:
    """Decides, per decode sequence, layer and KV head, which pages the query attends to; a policy with
    `has_prefill` also computes its prefill chunks' attention its own way. The defaults: no state, every page, dense
    prefill."""
    name = "dense"
    state_type: type[PolicyState] | None = None
    has_prefill = False

    def bind(self, layout: KVLayout, state: PolicyState | None) -> None:
        """Called once before the first select: the cache's shape, and the state of this kind (state_type's)."""

    def select(self, layer: int, q: torch.Tensor, kv_cache, decodes: DecodeBatch,
               scale: float) -> PageSelection | None:
        """The pages of `layer` the decode queries q [B, heads, head_dim] read; None: every page."""
        return None

    def prefill(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                seed: int) -> torch.Tensor:
        """With has_prefill: a prefill chunk's attention at `layer`, the chunk being the sequence's last q.shape[0]
        tokens. q [n, heads, head_dim]; k, v [kv_heads, seq_len, head_dim] (the chunk's own included); seed: the
        request's, for policies that draw at random."""
        raise NotImplementedError(f"attention policy {self.name!r} has no prefill of its own")


@dataclass
class AttendedTokens:
    """Tokens the decodes read over tokens they hold, summed over decodes and layers (a head's share averaged over
    KV heads): bench sparse's attended fraction. Counting syncs with the device once a layer; off unless set."""
    read: float = 0.0
    held: int = 0
    # Pages that no layer or head of a step read, over pages held: what a host-memory tier could hold for that step.
    unread_pages: int = 0
    held_pages: int = 0

    def add(self, blocks: SelectedBlocks | None, decodes: DecodeBatch) -> None:
        held = int(decodes.seq_lens.sum())
        self.held += held
        self.read += held if blocks is None else float(blocks.seq_lens.float().mean(1).sum())

    def add_step(self, pages_read: torch.Tensor, decodes: DecodeBatch) -> None:
        """pages_read [B, max_pages]: the pages some layer and head of the step read."""
        self.held_pages += int(decodes.num_pages.sum())
        self.unread_pages += int((decodes.valid_pages() & ~pages_read).sum())

    @property
    def fraction(self) -> float:
        return self.read / self.held if self.held else 1.0


@dataclass
class PolicyStep:
    """One policy's decodes in one step: rows [start, stop) of the step's decodes. decodes.scratch lives as long as
    the step's micro-batch, so a policy may pass a choice from one layer to the next."""
    policy: AttentionPolicy
    start: int
    stop: int
    decodes: DecodeBatch
    stats: AttendedTokens | None = None
    pages_read: torch.Tensor | None = None  # with stats: [B, max_pages], the pages some layer and head read

    def decode_blocks(self, layer: int, q: torch.Tensor, kv_cache, scale: float) -> SelectedBlocks | None:
        """The blocks each of these decodes' (sequence, KV head) reads at `layer`; None: every page."""
        selection = self.policy.select(layer, q[self.start:self.stop], kv_cache, self.decodes, scale)
        blocks = None if selection is None else selected_blocks(selection, self.decodes)
        if self.stats is not None:
            self.stats.add(blocks, self.decodes)
            self.pages_read = self._pages_read_after(selection)
        return blocks

    def _pages_read_after(self, selection: PageSelection | None) -> torch.Tensor:
        """The step's pages read so far ([B, max_pages] bool), this layer's included."""
        read = self.pages_read
        if read is None:
            read = torch.zeros(self.decodes.block_tables.shape, dtype=torch.bool, device=self.decodes.seq_lens.device)
        if selection is None:
            return read | self.decodes.valid_pages()
        pages, counts, _ = selection
        kept = torch.arange(pages.shape[-1], device=pages.device) < counts[..., None]  # [B, kv_heads, k]
        last = (self.decodes.num_pages - 1)[:, None, None]  # read anyway: stands in for the padding
        return read.scatter(1, torch.where(kept, pages, last).flatten(1), True)


@dataclass
class SparseStep:
    """What a step's attention needs of the policies: the states to update with its writes, and the decode rows
    each policy serves (the runner orders decodes so that each policy's rows are contiguous; rows in no group read
    every page)."""
    states: list[PolicyState]
    groups: list[PolicyStep] = field(default_factory=list)

    def on_write(self, layer: int, k: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        for state in self.states:
            state.on_write(layer, k, slot_mapping)

    def decode_segments(self, layer: int, q: torch.Tensor, kv_cache, scale: float,
                        num_decodes: int) -> list[tuple[int, int, SelectedBlocks | None]]:
        """Decode rows [0, num_decodes) as (start, stop, blocks) runs; blocks None: dense attention."""
        segments, row = [], 0
        for group in self.groups:
            if group.start > row:
                segments.append((row, group.start, None))
            segments.append((group.start, group.stop, group.decode_blocks(layer, q, kv_cache, scale)))
            row = group.stop
        if row < num_decodes:
            segments.append((row, num_decodes, None))
        return segments
