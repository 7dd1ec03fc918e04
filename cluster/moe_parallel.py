"""How a sharded MoE layer runs on the FFN workers, chosen per layer pass from the routed load (Tutel's adaptive
parallelism switching, arXiv:2206.03382, over the layout of models/layers/moe.py's `shard_`).

    expert-parallel: worker f runs the copies routed to its own experts, at full width. Its time follows its load,
                     so the step waits for the most loaded worker.
    expert-sliced:   every worker runs every routed copy at 1/y of the width: always balanced, but y times the
                     GEMM launches, each y times thinner.

Every FFN worker receives the same routing, so each reaches the same choice on its own; no message is needed.
Policy "adaptive" takes expert-sliced when the busiest worker would get more than `threshold` times the mean load.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from afdserve.engine.config import MOE_PARALLEL_POLICIES
from afdserve.models.layers.mlp import shard_range


@dataclass(frozen=True)
class MoEParallelPlanner:
    num_workers: int
    policy: str = "adaptive"
    threshold: float = 1.5  # busiest worker's load / mean load above which a pass runs expert-sliced

    def __post_init__(self) -> None:
        if self.policy not in MOE_PARALLEL_POLICIES:
            raise ValueError(f"moe_parallel must be one of {', '.join(MOE_PARALLEL_POLICIES)}, got {self.policy!r}")

    def expert_sliced(self, topk_ids: torch.Tensor, num_experts: int) -> bool:
        if self.policy != "adaptive":
            return self.policy == "sliced"
        return worker_imbalance(topk_ids, num_experts, self.num_workers) > self.threshold


def worker_imbalance(topk_ids: torch.Tensor, num_experts: int, num_workers: int) -> float:
    """Expert-parallel load of the busiest worker over the mean (1.0 = even; num_workers = all on one)."""
    counts = torch.bincount(topk_ids.reshape(-1), minlength=num_experts)
    loads = torch.stack([counts[slice(*shard_range(num_experts, f, num_workers))].sum()
                         for f in range(num_workers)]).float()
    mean = loads.mean()
    return float(loads.max() / mean) if mean > 0 else 1.0
