"""Which experts an expert cache keeps resident: Belady's eviction from a lookahead, and LRU as the baseline.

An FFN worker that holds only `capacity` of a layer's experts in fast memory loads a missing expert before using it,
evicting a resident one. With Read-ME's pre-gating router (models/layers/pre_gating_router.py) every queued token's
experts are known before the model runs, so the cache can evict the expert whose next use lies farthest ahead
(Belady's MIN: optimal for a known future, Belady 1966); without a future, LRU evicts the one used longest ago.

Accesses are one expert at a time: a step that needs several experts asks for them in ascending id order
(`step_accesses`). The policies here decide only which expert to evict; they hold no weights.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


class LRU:
    """Evicts the resident expert used longest ago."""
    name = "lru"

    def __init__(self):
        self.last_use: dict[int, int] = {}

    def touch(self, expert: int, now: int) -> None:
        self.last_use[expert] = now

    def victim(self, resident: set[int], now: int, future: Sequence[int]) -> int:
        return min(resident, key=lambda e: (self.last_use.get(e, -1), e))


class Belady(LRU):
    """Evicts the resident expert whose next use in `future` is farthest; among those the lookahead does not show,
    the least recently used (with the whole future these are never used again, and any of them is optimal).
    `future` is what the lookahead shows: the accesses after the current one, possibly cut short."""
    name = "belady"

    def victim(self, resident: set[int], now: int, future: Sequence[int]) -> int:
        next_use = {}
        for distance, expert in enumerate(future):
            if expert in resident and expert not in next_use:
                next_use[expert] = distance
                if len(next_use) == len(resident):
                    break
        return max(resident, key=lambda e: (next_use.get(e, len(future)), -self.last_use.get(e, -1), -e))


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 1.0


def simulate(accesses: Sequence[int], capacity: int, policy: LRU | Belady, lookahead: int | None = None) -> CacheStats:
    """Runs the access trace through a cache of `capacity` experts, empty at first; `lookahead`: how many future
    accesses Belady sees (None: all of them)."""
    if capacity < 1:
        raise ValueError(f"an expert cache needs capacity >= 1, got {capacity}")
    resident: set[int] = set()
    stats = CacheStats()
    for now, expert in enumerate(accesses):
        if expert in resident:
            stats.hits += 1
        else:
            stats.misses += 1
            if len(resident) == capacity:
                end = len(accesses) if lookahead is None else min(len(accesses), now + 1 + lookahead)
                resident.remove(policy.victim(resident, now, accesses[now + 1:end]))
            resident.add(expert)
        policy.touch(expert, now)
    return stats


def step_accesses(steps: Iterable[Iterable[int]]) -> list[int]:
    """The access trace of a sequence of steps, each the experts its tokens chose: its distinct experts, ascending."""
    return [expert for step in steps for expert in sorted(set(step))]
