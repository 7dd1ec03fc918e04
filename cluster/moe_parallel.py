"""How a sharded MoE layer runs on the FFN workers, chosen per layer pass from the routed load (Tutel's adaptive
parallelism switching, arXiv:2206.03382 §3.2, over the one layout of models/layers/moe.py's `shard_`: each worker
holds a slice of every expert).

    expert-sliced:   every worker runs every routed copy at 1/y of the width: always balanced, and no weight moves
                     (the tokens reach every worker anyway: the attention side broadcasts them and sums the parts).
    expert-parallel: worker f gathers its own experts whole from the peers' slices (cluster/expert_group.py) and runs
                     the copies routed to them at full width: fewer, wider GEMMs, but its time follows its load,
                     and the gather moves (y - 1) / y of its experts' bytes every pass.

Every FFN worker receives the same routing, so each reaches the same choice on its own; no message is needed.
Policy "adaptive" runs a pass expert-sliced when the busiest worker would get more than `threshold` times the mean
load, or when the pass is too small for the gather to pay (Tutel's `parallel_type='auto'` rule: slice while the
token copies x (y - 1) x 2 are fewer than the weight rows of a worker's experts); expert-parallel otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from afdserve.engine.config import MOE_PARALLEL_POLICIES
from afdserve.models.layers.mlp import shard_range
from afdserve.models.layers.moe import Experts


@dataclass(frozen=True)
class MoEParallelPlanner:
    num_workers: int
    policy: str = "adaptive"
    threshold: float = 1.5  # busiest worker's load / mean load above which a pass runs expert-sliced

    def __post_init__(self) -> None:
        if self.policy not in MOE_PARALLEL_POLICIES:
            raise ValueError(f"moe_parallel must be one of {', '.join(MOE_PARALLEL_POLICIES)}, got {self.policy!r}")

    def expert_sliced(self, topk_ids: torch.Tensor, experts: Experts) -> bool:
        if self.policy != "adaptive":
            return self.policy == "sliced"
        num_experts = experts.num_global_experts
        if worker_imbalance(topk_ids, num_experts, self.num_workers) > self.threshold:
            return True
        return not gather_pays_off(topk_ids.numel(), num_experts, experts.intermediate_size, self.num_workers)


def gather_pays_off(num_copies: int, num_experts: int, intermediate_size: int, num_workers: int) -> bool:
    """Tutel's rule, in rows of hidden size: the token copies an expert-sliced pass replicates to the other workers,
    both ways (copies x (y - 1) x 2), against a worker's experts' weights (3 x I rows each: gate, up, down)."""
    return num_copies * (num_workers - 1) * 2 >= 3 * intermediate_size * num_experts / num_workers


def worker_imbalance(topk_ids: torch.Tensor, num_experts: int, num_workers: int) -> float:
    """Expert-parallel load of the busiest worker over the mean (1.0 = even; num_workers = all on one)."""
    counts = torch.bincount(topk_ids.reshape(-1), minlength=num_experts)
    loads = torch.stack([counts[slice(*shard_range(num_experts, f, num_workers))].sum()
                         for f in range(num_workers)]).float()
    mean = loads.mean()
    return float(loads.max() / mean) if mean > 0 else 1.0
