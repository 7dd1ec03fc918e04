"""Read-ME's expert-aware batching (Cai, Ro et al., NeurIPS 2024, arXiv 2410.19123, §4): with a pre-gating router
the experts of a decode's next token are known from the token alone, so a step can take the decodes that share
experts and hold the others back — fewer distinct experts per step, fewer expert loads in an expert cache.

Each step, when more decodes are ready than `max_decodes`: the decodes held `max_wait_steps` steps go first (oldest
first: the aging bound), then the ready decodes bucketed by their token's experts, the largest bucket first (ties:
the longest-held decode, then the lowest expert ids), until `max_decodes` are chosen. Plain ints: the scheduler
holds the vocab -> experts table (`token_experts`, from models/readme.token_expert_table), no tensors.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Protocol


class Decode(Protocol):
    request_id: str
    all_token_ids: list[int]
    decode_steps_held: int  # consecutive steps this decode was ready and held back


@dataclass(frozen=True)
class ExpertBatching:
    token_experts: list[tuple[int, ...]]  # token id -> the experts the pre-gating router picks for it
    max_decodes: int
    max_wait_steps: int

    def __post_init__(self) -> None:
        if self.max_decodes < 1 or self.max_wait_steps < 0:
            raise ValueError(f"expert batching needs max_decodes >= 1 and max_wait_steps >= 0, got "
                             f"{self.max_decodes} and {self.max_wait_steps}")

    def experts_of(self, decode: Decode) -> tuple[int, ...]:
        """The experts of the token this decode feeds (its last one)."""
        return self.token_experts[decode.all_token_ids[-1]]

    def held(self, decodes: list[Decode]) -> set[str]:
        """The ids of the ready decodes to hold back this step."""
        if len(decodes) <= self.max_decodes:
            return set()
        longest_held_first = sorted(decodes, key=lambda d: -d.decode_steps_held)  # stable: queue order on ties
        chosen = [d for d in longest_held_first if d.decode_steps_held >= self.max_wait_steps][:self.max_decodes]
        taken = {d.request_id for d in chosen}
        buckets: dict[tuple[int, ...], list[Decode]] = defaultdict(list)
        for d in longest_held_first:
            if d.request_id not in taken:
                buckets[self.experts_of(d)].append(d)
        while len(chosen) < self.max_decodes and buckets:
            experts = max(buckets, key=lambda e: (len(buckets[e]), buckets[e][0].decode_steps_held,
                                                  [-x for x in e]))
            chosen += buckets.pop(experts)[:self.max_decodes - len(chosen)]
        return {d.request_id for d in decodes} - {d.request_id for d in chosen}
