"""An expert cache: `capacity` of a layer's experts resident in fast memory, the others memory-mapped from disk,
with Belady's eviction from a lookahead or LRU as the baseline (--expert-cache-size, --expert-cache-policy).

A pass loads each missing expert before using it, evicting a resident one. With Read-ME's pre-gating router
(models/layers/pre_gating_router.py) every token's experts are known before the model runs, so the cache can evict
the expert whose next use lies farthest ahead (Belady's MIN: optimal for a known future, Belady 1966); without a
future, LRU evicts the one used longest ago. The same knowledge lets the model prefetch: `ExpertCache.prefetch` loads
a layer's experts on a background thread while the layers before it compute.

Accesses are one expert at a time: a pass that needs several experts asks for them in ascending id order
(`step_accesses`). `LRU` and `Belady` decide only which expert to evict; `ExpertCache` holds the weights.
"""
from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

EXPERT_CACHE_POLICIES = ("belady", "lru")


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


@dataclass
class ExpertCacheTotals:
    """A process's expert caches summed over layers: what /metrics shows."""
    hits: int = 0
    misses: int = 0
    load_seconds: float = 0.0

    @classmethod
    def of(cls, caches: Iterable["ExpertCache"]) -> "ExpertCacheTotals":
        totals = cls()
        for cache in caches:
            totals.hits += cache.stats.hits
            totals.misses += cache.stats.misses
            totals.load_seconds += cache.load_seconds
        return totals


def make_policy(name: str) -> LRU | Belady:
    if name not in EXPERT_CACHE_POLICIES:
        raise ValueError(f"expert cache policy must be one of {', '.join(EXPERT_CACHE_POLICIES)}, got {name!r}")
    return Belady() if name == "belady" else LRU()


# The pass's MoE GEMMs over (x, w13, w2, topk_ids, topk_weights), an id of len(w13) meaning "skip this copy":
# kernels/moe's torch path, as an expert-parallel shard runs it.
MoEImpl = Callable[..., tuple[torch.Tensor, torch.Tensor]]


class ExpertCache:
    """One layer's experts: w13 [E, 2I, H] and w2 [E, H, I] moved to memory-mapped files in `directory`, and
    `capacity` slots of each in memory that the pass's GEMMs read. Loads count as misses, and the time spent copying
    experts into slots (on the pass's thread or the prefetch thread) is kept in `load_seconds`."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, capacity: int, policy: LRU | Belady, directory: Path,
                 prefetcher: ThreadPoolExecutor | None = None):
        num_experts = w13.shape[0]
        if not 1 <= capacity <= num_experts:
            raise ValueError(f"expert cache size must be in [1, {num_experts}] (the layer's experts), got {capacity}")
        self.num_experts, self.capacity, self.policy = num_experts, capacity, policy
        self.store_w13 = _memory_mapped(w13, directory / "w13.bin")
        self.store_w2 = _memory_mapped(w2, directory / "w2.bin")
        self.w13 = torch.empty((capacity, *w13.shape[1:]), dtype=w13.dtype)
        self.w2 = torch.empty((capacity, *w2.shape[1:]), dtype=w2.dtype)
        self.slot_of: dict[int, int] = {}  # resident expert -> slot
        self.stats = CacheStats()
        self.load_seconds = 0.0
        self._clock = 0  # accesses so far: the policies' notion of time
        self.prefetcher = prefetcher
        # The experts being made resident for the coming pass, and the job doing it (None: already done).
        self._prefetch: tuple[list[int], Future | None] | None = None

    def run(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
            moe_impl: MoEImpl) -> tuple[torch.Tensor, torch.Tensor]:
        """The pass over the resident slots, `capacity` experts at a time (ascending ids; the rest of the pass is
        the future Belady sees); returns the output and the copies each expert received."""
        needed = torch.unique(topk_ids).tolist()
        prefetched = self._finish_prefetch()
        out = None
        for start in range(0, len(needed), self.capacity):
            group = needed[start:start + self.capacity]
            if group != prefetched:
                self._make_resident(group, needed[start + self.capacity:])
            prefetched = None
            slot_ids = torch.full((self.num_experts,), self.capacity, dtype=torch.long, device=topk_ids.device)
            slot_ids[group] = torch.tensor([self.slot_of[e] for e in group], device=topk_ids.device)
            part, _ = moe_impl(x, self.w13, self.w2, slot_ids[topk_ids], topk_weights)
            out = part if out is None else out + part
        return out, torch.bincount(topk_ids.reshape(-1), minlength=self.num_experts)

    def prefetch(self, experts: list[int]) -> None:
        """Loads the first `capacity` of a coming pass's experts (ascending) on the prefetch thread; the pass waits
        for it. Without a prefetch thread, nothing. When all of them are resident no thread is woken (handing work
        to a thread and back costs more than the bookkeeping)."""
        if self.prefetcher is None:
            return
        self._finish_prefetch()
        experts = sorted(experts)
        group, future = experts[:self.capacity], experts[self.capacity:]
        if all(e in self.slot_of for e in group):
            self._make_resident(group, future)  # hits only: no load
            self._prefetch = (group, None)
        else:
            self._prefetch = (group, self.prefetcher.submit(self._make_resident, group, future))

    def _finish_prefetch(self) -> list[int] | None:
        if self._prefetch is None:
            return None
        group, job = self._prefetch
        self._prefetch = None
        if job is not None:
            job.result()
        return group

    def _make_resident(self, group: list[int], future: list[int]) -> None:
        """Every expert of `group` (at most `capacity`) in a slot, evicting others than the group's."""
        for expert in group:
            self._clock += 1
            if expert in self.slot_of:
                self.stats.hits += 1
            else:
                self.stats.misses += 1
                if len(self.slot_of) < self.capacity:
                    slot = len(self.slot_of)
                else:
                    evictable = set(self.slot_of) - set(group)
                    slot = self.slot_of.pop(self.policy.victim(evictable, self._clock, [*group, *future]))
                start = time.perf_counter()
                self.w13[slot].copy_(self.store_w13[expert])
                self.w2[slot].copy_(self.store_w2[expert])
                self.load_seconds += time.perf_counter() - start
                self.slot_of[expert] = slot
            self.policy.touch(expert, self._clock)


def _memory_mapped(t: torch.Tensor, path: Path) -> torch.Tensor:
    """A copy of `t` in a file mapped into memory: the OS pages it in on use and may drop it again."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(t.numel() * t.element_size())
    mapped = torch.from_file(str(path), shared=True, size=t.numel(), dtype=t.dtype).view(t.shape)
    mapped.copy_(t)
    return mapped


def offload_directory(parent: Path | None) -> tempfile.TemporaryDirectory:
    """Where a model's offloaded experts live while it runs (removed with the returned object)."""
    if parent is not None:
        Path(parent).mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix="afdserve-experts-", dir=parent)
