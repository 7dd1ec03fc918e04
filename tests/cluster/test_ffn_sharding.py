"""FFN shards for AFD with several FFN workers: the shards' partial outputs sum to the unsharded block's.

Oracles: the unsharded module, and the naive per-token MoE reference (kernels/moe/reference.py) with the copies
routed to other workers' experts dropped.
"""
import copy

import pytest
import torch

from afdserve.kernels.moe import fused_experts_torch, moe_reference
from afdserve.models.layers.mlp import GatedMLP, shard_range
from afdserve.models.layers.moe import MoEBlock
from afdserve.models.layers.moe_router import Routing

H, T, E, K = 16, 11, 6, 2


def _randomize(module: torch.nn.Module) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(0)
    for p in module.parameters():
        p.data = torch.randn(p.shape, generator=gen) * 0.3
    for m in module.modules():
        if hasattr(m, "prepare_for_inference") and m is not module:
            m.prepare_for_inference()
    return module


def _sum_of_shards(module, world: int, *args) -> torch.Tensor:
    total = torch.zeros(T, H)
    for rank in range(world):
        shard = copy.deepcopy(module)
        shard.shard_(rank, world)
        total += shard(*args)
    return total


def _weights(module) -> dict[str, int]:
    tensors = dict(module.named_parameters())
    tensors.update(w13_sliced=module.experts.w13_sliced, w2_sliced=module.experts.w2_sliced)
    return {name: t.data_ptr() for name, t in tensors.items()}


def _routing(seed=1) -> Routing:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    return Routing(ids, torch.rand(T, K, generator=gen))


@torch.inference_mode()
@pytest.mark.parametrize("world", [2, 3])
def test_dense_mlp_shards_sum_to_the_whole(world):
    mlp = _randomize(GatedMLP(H, 24))
    x = torch.randn(T, H)
    torch.testing.assert_close(_sum_of_shards(mlp, world, x), mlp(x), atol=1e-5, rtol=1e-5)


@torch.inference_mode()
@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("kind", ["gated-shared", "shared", "residual"])
def test_moe_block_expert_parallel_shards_sum_to_the_whole(world, kind):
    extra = {"gated-shared": dict(shared_intermediate_size=20, shared_expert_gate=True),
             "shared": dict(shared_intermediate_size=20),
             "residual": dict(residual_intermediate_size=20)}[kind]
    block = _randomize(MoEBlock(H, E, 12, **extra))
    x, routing = torch.randn(T, H), _routing()
    torch.testing.assert_close(_sum_of_shards(block, world, x, routing), block(x, routing), atol=1e-5, rtol=1e-5)


@torch.inference_mode()
@pytest.mark.parametrize("world", [2, 3])
def test_one_shard_layout_serves_expert_parallel_and_expert_sliced_passes(world):
    """Tutel's identical layout: the same shards, without moving a weight, run either way and sum to the whole."""
    block = _randomize(MoEBlock(H, E, 12, shared_intermediate_size=20, shared_expert_gate=True))
    x, routing = torch.randn(T, H), _routing()
    whole = block(x, routing)
    shards = [copy.deepcopy(block) for _ in range(world)]
    for rank, shard in enumerate(shards):
        shard.shard_(rank, world)
    before = [_weights(s) for s in shards]
    for sliced in (True, False, True):  # ends on a sliced pass, whose counts are checked below
        passes = [s(x, routing, expert_sliced=sliced) for s in shards]
        torch.testing.assert_close(sum(passes), whole, atol=1e-5, rtol=1e-5)
    assert [_weights(s) for s in shards] == before
    # Expert-sliced: every worker ran every routed copy (at a slice of the width).
    counts = torch.bincount(routing.topk_ids.reshape(-1), minlength=E)
    assert all(torch.equal(s.experts.last_tokens_per_expert, counts) for s in shards)


def test_planner_picks_sliced_for_skewed_routing_only():
    from afdserve.cluster.moe_parallel import MoEParallelPlanner, worker_imbalance
    balanced = torch.tensor([[0, 3], [1, 4], [2, 5], [3, 0]])  # experts 0-2 on worker 0, 3-5 on worker 1
    skewed = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 3]])  # 7 of 8 copies on worker 0
    assert worker_imbalance(balanced, E, 2) == 1.0
    assert worker_imbalance(skewed, E, 2) == pytest.approx(7 / 4)
    adaptive = MoEParallelPlanner(2, "adaptive", threshold=1.5)
    assert not adaptive.expert_sliced(balanced, E) and adaptive.expert_sliced(skewed, E)
    assert MoEParallelPlanner(2, "sliced").expert_sliced(balanced, E)
    assert not MoEParallelPlanner(2, "ep").expert_sliced(skewed, E)
    with pytest.raises(ValueError, match="moe_parallel must be one of"):
        MoEParallelPlanner(2, "tp")


@torch.inference_mode()
def test_an_expert_shard_computes_only_its_experts():
    block = _randomize(MoEBlock(H, E, 12))
    x, routing = torch.randn(T, H), _routing()
    lo, hi = shard_range(E, 1, 2)
    block.shard_(1, 2)
    local = (routing.topk_ids >= lo) & (routing.topk_ids < hi)
    expected = moe_reference(x, block.experts.w13, block.experts.w2, (routing.topk_ids - lo).clamp(0, hi - lo - 1),
                             routing.topk_weights * local)
    torch.testing.assert_close(block(x, routing), expected, atol=1e-5, rtol=1e-5)
    counts = torch.bincount(routing.topk_ids[local] - lo, minlength=hi - lo)
    assert torch.equal(block.experts.last_tokens_per_expert, counts)


def test_copies_routed_past_the_last_expert_are_skipped():
    """fused_experts_torch's "not here" id (E) contributes nothing: equal to the reference with those weights 0."""
    gen = torch.Generator().manual_seed(2)
    x, w13, w2 = torch.randn(T, H, generator=gen), torch.randn(E, 24, H, generator=gen), torch.randn(E, H, 12, generator=gen)
    ids = torch.randint(0, E + 1, (T, K), generator=gen)
    weights = torch.rand(T, K, generator=gen)
    here = ids < E
    out, counts = fused_experts_torch(x, w13, w2, ids, weights)
    torch.testing.assert_close(out, moe_reference(x, w13, w2, ids.clamp(max=E - 1), weights * here),
                               atol=1e-4, rtol=1e-5)
    assert counts.tolist() == torch.bincount(ids[here], minlength=E).tolist()


def test_shard_range_covers_everything_once_and_rejects_too_many_workers():
    for size, world in [(10, 3), (6, 6), (1536, 2), (7, 4)]:
        parts = [shard_range(size, r, world) for r in range(world)]
        assert parts[0][0] == 0 and parts[-1][1] == size
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:])) and all(hi > lo for lo, hi in parts)
    with pytest.raises(ValueError, match="cannot split 2 items over 3 workers"):
        shard_range(2, 0, 3)
