"""What an attention backend needs to know about one step's flat batch (ARCHITECTURE.md, seams 2 and 3).

The model runner orders each step's sequences decodes first, so tokens [0, num_decodes) are one-token decodes and
the rest are prefill chunks. Built once per step and shared by every layer; the Python ints in `prefills` keep the
per-layer loop free of host syncs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PrefillSeq:
    token_start: int  # first row of the chunk in the flat batch
    num_tokens: int  # rows in the chunk
    seq_len: int  # tokens with KV after this step (cached prefix + chunk)
    block_ids: torch.Tensor  # [ceil(seq_len / block_size)] long


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] long: block_id * block_size + offset for each new token
    block_size: int
    num_decodes: int
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] long, padded with 0
    decode_mask_bias: torch.Tensor  # [num_decodes, 1, max_blocks * block_size] float: 0, or -inf past seq_len
    prefills: list[PrefillSeq] = field(default_factory=list)
    kv_plan: object | None = None  # int4 / saq KV caches: the step's kv_tiers.KVStepPlan, replayed by every layer
