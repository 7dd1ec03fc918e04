"""Splitting one step's scheduled requests into micro-batches for the A<->F pipeline."""
from __future__ import annotations

from afdserve.engine.scheduler import ScheduledRequest


def split_micro_batches(scheduled: list[ScheduledRequest], m: int) -> list[list[int]]:
    """Contiguous groups of scheduled indices with about equal token counts; fewer than m when there are fewer
    sequences. Each group is a whole set of sequences, so attention metadata splits cleanly."""
    m = max(1, min(m, len(scheduled)))
    total = sum(s.num_tokens for s in scheduled)
    groups: list[list[int]] = [[] for _ in range(m)]
    acc = 0
    for i, item in enumerate(scheduled):
        share = (2 * acc + item.num_tokens) * m // (2 * total)  # the group holding this sequence's token midpoint
        remaining = len(scheduled) - i
        groups[max(min(m - 1, share), m - remaining)].append(i)  # keep a sequence for every later group
        acc += item.num_tokens
    return [g for g in groups if g]
