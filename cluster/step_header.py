"""The small control message that opens each step on the A->F channel: what the FFN worker must expect."""
from __future__ import annotations

import torch

MAX_MICRO_BATCHES = 64
STOP, STEP = 0, 1


def encode_header(op: int, tokens_per_micro_batch: list[int]) -> torch.Tensor:
    if len(tokens_per_micro_batch) > MAX_MICRO_BATCHES:
        raise ValueError(f"at most {MAX_MICRO_BATCHES} micro-batches, got {len(tokens_per_micro_batch)}")
    header = torch.zeros(2 + MAX_MICRO_BATCHES, dtype=torch.int64)
    header[0], header[1] = op, len(tokens_per_micro_batch)
    header[2:2 + len(tokens_per_micro_batch)] = torch.tensor(tokens_per_micro_batch, dtype=torch.int64)
    return header


def empty_header() -> torch.Tensor:
    return torch.zeros(2 + MAX_MICRO_BATCHES, dtype=torch.int64)


def decode_header(header: torch.Tensor) -> tuple[int, list[int]]:
    op, m = int(header[0]), int(header[1])
    return op, header[2:2 + m].tolist()
