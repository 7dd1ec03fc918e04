"""What an attention backend needs to know about one step's flat batch (docs/architecture.md, seams 2 and 3).

The model runner orders each step's sequences decodes first, so tokens [0, num_decodes) are one-token decodes and
the rest are prefill chunks: first those with dense attention, then those whose attention policy computes its own
(HyperAttention's; `PrefillSeq.policy`). Built once per step and shared by every layer; the Python ints in
`prefills` keep the per-layer loop free of host syncs. The torch backend reads `decode_block_tables` /
`decode_mask_bias` and `prefills`; the Triton backend reads `decode_seq_lens` and `prefill_batch`, the dense prefills
as one varlen batch, built on first use so that the torch path never pays for it.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from afdserve.kernels.attention.sparse.policy import AttentionPolicy, SparseStep


@dataclass
class PrefillSeq:
    token_start: int  # first row of the chunk in the flat batch
    num_tokens: int  # rows in the chunk
    seq_len: int  # tokens with KV after this step (cached prefix + chunk)
    block_ids: torch.Tensor  # [ceil(seq_len / block_size)] long
    policy: AttentionPolicy | None = None  # an attention policy with a prefill of its own; None: dense
    seed: int = 0  # the request's seed, for a policy that draws at random


class PrefillBatch(NamedTuple):
    """The step's dense prefill chunks as one varlen batch (rows counted from the first prefill row)."""
    query_start_loc: torch.Tensor  # [P + 1] int32: chunk p is rows query_start_loc[p]:query_start_loc[p + 1]
    seq_lens: torch.Tensor  # [P] int32: tokens with KV after this step
    block_tables: torch.Tensor  # [P, max_blocks] long, padded with 0
    max_query_len: int


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] long: block_id * block_size + offset for each new token
    block_size: int
    num_decodes: int
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] long, padded with 0
    decode_mask_bias: torch.Tensor  # [num_decodes, 1, max_blocks * block_size] float: 0, or -inf past seq_len
    prefills: list[PrefillSeq] = field(default_factory=list)
    kv_plan: object | None = None  # int4 / saq KV caches: the step's kv_tiers.KVStepPlan, replayed by every layer
    decode_seq_lens: torch.Tensor | None = None  # [num_decodes] long: tokens with KV after this step
    # The attention policies' part in this step (kernels/attention/sparse/policy.py); None: no policy in use.
    sparse: SparseStep | None = None

    def decode_segments(self, layer: int, q: torch.Tensor, kv_cache, scale: float) -> list:
        """The decode rows as (start, stop, blocks) runs, one per attention policy in the step: blocks is the
        policy's sparse.selection.SelectedBlocks at `layer`, or None where every page is read."""
        if not self.num_decodes:
            return []
        if self.sparse is None:
            return [(0, self.num_decodes, None)]
        return self.sparse.decode_segments(layer, q, kv_cache, scale, self.num_decodes)

    @functools.cached_property
    def dense_prefills(self) -> list[PrefillSeq]:
        return [p for p in self.prefills if p.policy is None]

    @functools.cached_property
    def prefill_batch(self) -> PrefillBatch:
        # Dense prefill chunks follow one another after the decodes, so the row offsets are the running chunk sizes.
        device = self.slot_mapping.device
        prefills = self.dense_prefills
        return PrefillBatch(
            query_start_loc=torch.tensor([0, *itertools.accumulate(p.num_tokens for p in prefills)],
                                         dtype=torch.int32).to(device),
            seq_lens=torch.tensor([p.seq_len for p in prefills], dtype=torch.int32).to(device),
            block_tables=torch.nn.utils.rnn.pad_sequence([p.block_ids for p in prefills], batch_first=True),
            max_query_len=max(p.num_tokens for p in prefills))
