"""SparseD (Wang et al., ICLR 2026) for autoregressive decodes: head-specific page patterns, chosen once and reused.

SparseD observed that attention patterns differ between heads but hardly change from one denoising step to the
next, and that early steps matter most. Our decode adaptation: a request's first `skip_steps` decodes read every
page; then at a selection step each KV head scores the pages by the mean over the page's tokens of its query heads'
largest softmax probability (a full read), keeps the int(pages * keep_fraction) + 1 best, and the next
`refresh_steps` - 1 decodes read those pages plus every page made since the selection, the first page and the last;
then it selects again. The choice is per request and layer, kept in the request's policy state and dropped with it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from afdserve.kernels.attention.sparse.delta import attention_probabilities
from afdserve.kernels.attention.sparse.policy import AttentionPolicy, KVLayout
from afdserve.kernels.attention.sparse.selection import DecodeBatch, PageSelection, compact, last_page_mask


@dataclass
class SparseDPolicy(AttentionPolicy):
    keep_fraction: float = 0.3  # fraction of pages kept per KV head (SparseD's select, rho)
    skip_steps: int = 16  # first decodes of a request that read every page
    refresh_steps: int = 32  # decodes between selections
    name = "sparsed"

    def __post_init__(self) -> None:
        if not 0 < self.keep_fraction <= 1:
            raise ValueError(f"sparsed: keep_fraction must be in (0, 1], got {self.keep_fraction}")
        if self.skip_steps < 0 or self.refresh_steps < 1:
            raise ValueError(f"sparsed: skip_steps must be >= 0 and refresh_steps >= 1, got {self.skip_steps} and "
                             f"{self.refresh_steps}")

    def bind(self, layout: KVLayout, state: None) -> None:
        self.kv_heads = layout.kv_heads

    def select(self, layer: int, q: torch.Tensor, kv_cache, decodes: DecodeBatch,
               scale: float) -> PageSelection | None:
        valid = decodes.valid_pages()  # [B, max_pages]
        kept = valid[:, None, :].repeat(1, self.kv_heads, 1)  # full reads unless a row reuses a choice
        selecting = [i for i, step in enumerate(decodes.decode_steps)
                     if self._selects(step, decodes.request_states[i], layer)]
        if selecting:
            rows = torch.tensor(selecting, device=q.device)
            rows_of = DecodeBatch(decodes.block_tables[rows], decodes.seq_lens[rows], decodes.page_size,
                                  decodes.seeds[rows])
            scores = self.page_scores(q[rows], kv_cache, rows_of, scale)  # [rows, kv_heads, max_pages]
            for i, row_scores in zip(selecting, scores):
                num_pages = int(decodes.num_pages[i])
                keep = int(num_pages * self.keep_fraction) + 1
                chosen = row_scores[:, :num_pages].topk(min(keep, num_pages), dim=-1).indices  # [kv_heads, keep]
                decodes.request_states[i][("sparsed", layer)] = (chosen, num_pages, decodes.decode_steps[i])
        for i, step in enumerate(decodes.decode_steps):
            choice = decodes.request_states[i].get(("sparsed", layer))
            if step < self.skip_steps or choice is None or choice[2] == step:
                continue  # a full read: the first decodes, or the selection step itself
            chosen, pages_then, _ = choice
            row = torch.zeros_like(kept[i])
            row.scatter_(1, chosen, True)
            row[:, pages_then:] = True  # pages made since the selection
            row[:, 0] = True  # the sink
            kept[i] = row & valid[i]
        kept |= last_page_mask(decodes)[:, None, :]
        return compact(kept)

    def _selects(self, step: int, request_state: dict, layer: int) -> bool:
        """Whether this decode is a selection step: the first after the skipped ones, then every refresh_steps, or
        one that finds no choice (a resumed request)."""
        if step < self.skip_steps:
            return False
        return ("sparsed", layer) not in request_state or (step - self.skip_steps) % self.refresh_steps == 0

    @staticmethod
    def page_scores(q: torch.Tensor, kv_cache, decodes: DecodeBatch, scale: float) -> torch.Tensor:
        """[B, kv_heads, max_pages]: per KV head, the mean over each page's tokens of the max over its query heads
        of the full attention's probability (SparseD's block score, per page)."""
        probs = attention_probabilities(q, kv_cache, decodes, scale).amax(dim=2)  # [B, kv_heads, L]
        num_seqs, kv_heads, _ = probs.shape
        sums = probs.view(num_seqs, kv_heads, -1, decodes.page_size).sum(-1)
        position = torch.arange(probs.shape[-1], device=q.device).view(-1, decodes.page_size)
        tokens = (position < decodes.seq_lens[:, None, None]).sum(-1).clamp(min=1)  # [B, max_pages]
        return sums / tokens[:, None, :]
