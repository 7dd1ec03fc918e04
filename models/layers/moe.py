"""The MoE FFN half: routed experts in stacked weights, plus an optional always-on shared expert or residual MLP.

    MoEBlock(x [T, H], routing) = Experts(x, topk_ids, topk_weights)            routed, kernels/moe
                                + [sigmoid(shared_expert_gate(x)) *] shared_expert(x)
    or, Residual-MoE (DeepSpeed-MoE `use_residual=True`, arXiv:2201.05596):
        coef = softmax(coefficient(x))   [T, 2], Linear(H, 2) with bias, in fp32
        MoEBlock(x, routing) = Experts(x, ...) * coef[:, 0] + residual_mlp(x) * coef[:, 1]

Sharding (AFD with several FFN workers), one layout for two ways of running the routed experts (Tutel's identical
layout, arXiv:2206.03382 §3.2): `shard_` keeps slice f of every expert's intermediate dimension and nothing else, so
each of y workers holds 1/y of the expert bytes. A pass runs either expert-sliced (every routed copy at 1/y of the
width: the tokens are replicated to every worker and the partial outputs summed, which the A->F broadcast and the
attention side's sum already do) or expert-parallel (worker f gathers the other slices of its own experts from its
peers for the pass, `Experts.gather`, and runs only the copies routed to them at full width). The two differ only in
which collective runs; no weight is kept twice. The shared expert / residual MLP are always sliced. Either way the
workers' outputs sum to the whole block's (every term is linear in the parts, the gate and mixing coefficients too).

Routing is computed on the attention side (models/layers/moe_router.py) and passed in, so this block can move into an
FFN worker unchanged (docs/architecture.md, seam 1); the residual coefficient needs only x, so it is computed here.
Shared experts: DeepSeekMoE's `n_shared_experts` are one gated MLP of width n_shared * moe_intermediate_size;
Qwen2-MoE's `shared_expert` is scaled per token by a sigmoid gate.
"""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from afdserve.kernels.moe import select_moe_impl
from afdserve.models.layers.expert_cache import ExpertCache, make_policy
from afdserve.models.layers.linear import Linear
from afdserve.models.layers.mlp import GatedMLP, shard_range
from afdserve.models.layers.moe_router import Routing


class Experts(nn.Module):
    """E routed SwiGLU experts: w13 [E, 2I, H] (gate rows, then up rows) and w2 [E, H, I]; after `shard_`, this
    worker's slice of every expert: w13 [E, 2I_f, H], w2 [E, H, I_f]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.num_global_experts = num_experts
        self.intermediate_size = intermediate_size
        self.shard: tuple[int, int] | None = None  # (rank, world) after shard_
        # Set by the FFN worker on a sharded block: whole weights of this worker's experts for an expert-parallel
        # pass, from its slice and its peers' (cluster/expert_group.py).
        self.gather: Callable[["Experts"], tuple[torch.Tensor, torch.Tensor]] | None = None
        self.cache: ExpertCache | None = None  # after offload_: the resident experts, the rest memory-mapped
        # Tokens (token copies, T*k in all) each expert received in the last forward: balancing / AFD planner input.
        self.last_tokens_per_expert: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                expert_sliced: bool = False) -> torch.Tensor:
        if self.cache is not None:
            out, self.last_tokens_per_expert = self.cache.run(x, topk_ids, topk_weights,
                                                              select_moe_impl(x.device.type))
            return out
        if expert_sliced and self.shard is None:
            raise ValueError("an expert-sliced pass needs a sharded MoE block (shard_)")
        if self.shard is None or expert_sliced:  # whole experts, or this worker's slice of every one
            out, self.last_tokens_per_expert = select_moe_impl(x.device.type)(x, self.w13, self.w2, topk_ids,
                                                                              topk_weights)
            return out
        if self.gather is None:
            raise ValueError("an expert-parallel pass on a sharded MoE block needs its weight gather (Experts.gather)")
        if x.device.type != "cpu":
            raise NotImplementedError("expert-parallel shards run the torch expert path only")
        lo, hi = self.local_experts
        w13, w2 = self.gather(self)
        local = topk_ids - lo
        topk_ids = torch.where((local >= 0) & (local < hi - lo), local, hi - lo)  # hi - lo: not here
        out, self.last_tokens_per_expert = select_moe_impl(x.device.type)(x, w13, w2, topk_ids, topk_weights)
        return out

    @property
    def local_experts(self) -> tuple[int, int]:
        """The experts [lo, hi) whose copies this shard runs in an expert-parallel pass."""
        return shard_range(self.num_global_experts, *self.shard)

    def slice_of(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This shard's slice of experts [lo, hi): w13 [n, 2I_f, H], w2 [n, H, I_f]."""
        return self.w13[lo:hi], self.w2[lo:hi]

    def offload_(self, capacity: int, policy: str, directory: Path, prefetcher: ThreadPoolExecutor | None) -> None:
        """Keeps `capacity` experts in memory and the rest in memory-mapped files in `directory`
        (models/layers/expert_cache.py); the weights leave the module's parameters."""
        if self.shard is not None:
            raise ValueError("an expert cache holds whole experts: it does not combine with FFN sharding")
        self.cache = ExpertCache(self.w13.detach(), self.w2.detach(), capacity, make_policy(policy), directory,
                                 prefetcher)
        self.w13 = self.w2 = None

    def shard_(self, rank: int, world: int) -> None:
        """Keeps slice `rank` of `world` of every expert's intermediate dimension, in place."""
        s_lo, s_hi = shard_range(self.intermediate_size, rank, world)
        inter = self.intermediate_size
        w13 = self.w13.detach()
        self.w13 = nn.Parameter(torch.cat([w13[:, s_lo:s_hi], w13[:, inter + s_lo:inter + s_hi]], dim=1),
                                requires_grad=False)
        self.w2 = nn.Parameter(self.w2.detach()[:, :, s_lo:s_hi].contiguous(), requires_grad=False)
        self.shard = (rank, world)


def join_slices(slices: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole expert weights from every shard's slice of them, in shard order: w13 [n, 2I, H], w2 [n, H, I]."""
    gates, ups = zip(*(w13.chunk(2, dim=1) for w13, _ in slices))
    return torch.cat([*gates, *ups], dim=1), torch.cat([w2 for _, w2 in slices], dim=2)


class MoEBlock(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, intermediate_size: int,
                 shared_intermediate_size: int = 0, shared_expert_gate: bool = False,
                 residual_intermediate_size: int = 0):
        super().__init__()
        self.experts = Experts(num_experts, hidden_size, intermediate_size)
        self.shared_expert = GatedMLP(hidden_size, shared_intermediate_size) if shared_intermediate_size else None
        if shared_expert_gate and self.shared_expert is None:
            raise ValueError("a shared expert gate needs a shared expert")
        if residual_intermediate_size and self.shared_expert is not None:
            raise ValueError("an MoE block has either a shared expert or a residual MLP, not both")
        self.shared_expert_gate = Linear(hidden_size, 1, bias=False) if shared_expert_gate else None
        self.residual_mlp = GatedMLP(hidden_size, residual_intermediate_size) if residual_intermediate_size else None
        self.coefficient = Linear(hidden_size, 2, bias=True) if residual_intermediate_size else None

    def forward(self, x: torch.Tensor, routing: Routing, expert_sliced: bool = False) -> torch.Tensor:
        """expert_sliced: on a sharded block, run this pass's experts sliced instead of expert-parallel (AFD with
        several FFN workers; cluster/moe_parallel.py chooses per pass)."""
        out = self.experts(x, routing.topk_ids, routing.topk_weights, expert_sliced)
        if self.residual_mlp is not None:
            return self._mix_residual(x, out)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out

    def shard_(self, rank: int, world: int) -> None:
        """Expert parallelism for the routed experts, a tensor-parallel slice of the always-on MLP."""
        self.experts.shard_(rank, world)
        for mlp in (self.shared_expert, self.residual_mlp):
            if mlp is not None:
                mlp.shard_(rank, world)

    def _mix_residual(self, x: torch.Tensor, moe_out: torch.Tensor) -> torch.Tensor:
        """Residual-MoE: the routed output and the dense MLP's, mixed per token by a learned 2-way softmax."""
        coef = self.coefficient(x).float().softmax(dim=-1)
        mixed = moe_out.float() * coef[:, :1] + self.residual_mlp(x).float() * coef[:, 1:]
        return mixed.to(x.dtype)
