"""FFN shards for AFD with several FFN workers: the shards' partial outputs sum to the unsharded block's, each
shard holds 1/y of the expert weights, and an expert-parallel pass gathers its experts whole from the peers.

Oracles: the unsharded module, and the naive per-token MoE reference (kernels/moe/reference.py) with the copies
routed to other workers' experts dropped.
"""
import copy
import socket
import threading

import pytest
import torch

from afdserve.kernels.moe import fused_experts_torch, moe_reference
from afdserve.models.layers.mlp import GatedMLP, shard_range
from afdserve.models.layers.moe import MoEBlock, join_slices
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


def _shards(module, world: int) -> list:
    """The module's `world` shards; a MoE block's expert-parallel passes gather from the others in this process
    (what cluster/expert_group.py does between FFN workers)."""
    shards = [copy.deepcopy(module) for _ in range(world)]
    for rank, shard in enumerate(shards):
        shard.shard_(rank, world)
        if isinstance(shard, MoEBlock):
            shard.experts.gather = lambda experts: join_slices([s.experts.slice_of(*experts.local_experts)
                                                                for s in shards])
    return shards


def _sum_of_shards(module, world: int, *args, **kwargs) -> torch.Tensor:
    return sum(shard(*args, **kwargs) for shard in _shards(module, world))


def _weights(module) -> dict[str, int]:
    return {name: t.data_ptr() for name, t in module.named_parameters()}


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
@pytest.mark.parametrize("sliced", [False, True])
def test_moe_block_shards_sum_to_the_whole(world, kind, sliced):
    extra = {"gated-shared": dict(shared_intermediate_size=20, shared_expert_gate=True),
             "shared": dict(shared_intermediate_size=20),
             "residual": dict(residual_intermediate_size=20)}[kind]
    block = _randomize(MoEBlock(H, E, 12, **extra))
    x, routing = torch.randn(T, H), _routing()
    torch.testing.assert_close(_sum_of_shards(block, world, x, routing, expert_sliced=sliced), block(x, routing),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_each_shard_holds_its_share_of_the_expert_bytes(world):
    """One layout, no second copy: a shard's routed-expert bytes are 1/y of the whole (to a row of rounding)."""
    block = _randomize(MoEBlock(H, E, 12, shared_intermediate_size=20))

    def expert_bytes(b):
        return sum(p.numel() * p.element_size() for p in b.experts.parameters())
    whole, shards = expert_bytes(block), [expert_bytes(s) for s in _shards(block, world)]
    assert sum(shards) == whole
    row_bytes = whole // (12 * E)  # one intermediate row of every expert's three matrices
    assert all(abs(b - whole / world) <= row_bytes for b in shards)


@torch.inference_mode()
@pytest.mark.parametrize("world", [2, 3])
def test_one_shard_layout_serves_expert_parallel_and_expert_sliced_passes(world):
    """Tutel's identical layout: the same shards run either way, keep their weights, and sum to the whole."""
    block = _randomize(MoEBlock(H, E, 12, shared_intermediate_size=20, shared_expert_gate=True))
    x, routing = torch.randn(T, H), _routing()
    whole = block(x, routing)
    shards = _shards(block, world)
    before = [_weights(s) for s in shards]
    for sliced in (True, False, True):  # ends on a sliced pass, whose counts are checked below
        passes = [s(x, routing, expert_sliced=sliced) for s in shards]
        torch.testing.assert_close(sum(passes), whole, atol=1e-5, rtol=1e-5)
    assert [_weights(s) for s in shards] == before
    # Expert-sliced: every worker ran every routed copy (at a slice of the width).
    counts = torch.bincount(routing.topk_ids.reshape(-1), minlength=E)
    assert all(torch.equal(s.experts.last_tokens_per_expert, counts) for s in shards)


def test_planner_switches_both_ways_with_the_routing():
    """Adaptive: skewed routing runs sliced (slicing balances the workers), balanced routing runs expert-parallel
    once the pass is big enough for the weight gather to pay (Tutel's rule), and back again."""
    from afdserve.cluster.moe_parallel import MoEParallelPlanner, gather_pays_off, worker_imbalance
    experts = MoEBlock(H, E, 12).experts  # experts 0-2 on worker 0, 3-5 on worker 1
    balanced = torch.tensor([[0, 3], [1, 4], [2, 5], [3, 0]])
    skewed = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 3]])  # 7 of 8 copies on worker 0
    assert worker_imbalance(balanced, E, 2) == 1.0
    assert worker_imbalance(skewed, E, 2) == pytest.approx(7 / 4)
    # Two workers hold 3 experts of 3 x 12 weight rows each: 108 rows; the gather pays from 54 copies.
    assert not gather_pays_off(53, E, 12, 2) and gather_pays_off(54, E, 12, 2)
    adaptive = MoEParallelPlanner(2, "adaptive", threshold=1.5)
    big_balanced, big_skewed = balanced.repeat(8, 1), skewed.repeat(8, 1)  # 64 copies each
    assert [adaptive.expert_sliced(ids, experts) for ids in (big_balanced, big_skewed, big_balanced, balanced)] == [
        False, True, False, True]
    assert MoEParallelPlanner(2, "sliced").expert_sliced(big_balanced, experts)
    assert not MoEParallelPlanner(2, "ep").expert_sliced(skewed, experts)
    with pytest.raises(ValueError, match="moe_parallel must be one of"):
        MoEParallelPlanner(2, "tp")


@torch.inference_mode()
def test_an_expert_shard_computes_only_its_experts():
    block = _randomize(MoEBlock(H, E, 12))
    x, routing = torch.randn(T, H), _routing()
    lo, hi = shard_range(E, 1, 2)
    w13, w2 = block.experts.w13[lo:hi], block.experts.w2[lo:hi]
    shard = _shards(block, 2)[1]
    local = (routing.topk_ids >= lo) & (routing.topk_ids < hi)
    expected = moe_reference(x, w13, w2, (routing.topk_ids - lo).clamp(0, hi - lo - 1), routing.topk_weights * local)
    torch.testing.assert_close(shard(x, routing), expected, atol=1e-5, rtol=1e-5)
    counts = torch.bincount(routing.topk_ids[local] - lo, minlength=hi - lo)
    assert torch.equal(shard.experts.last_tokens_per_expert, counts)
    with pytest.raises(ValueError, match="needs its weight gather"):
        shard.experts.gather = None
        shard(x, routing)


@torch.inference_mode()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_ffn_workers_group_gathers_whole_experts_over_gloo(dtype):
    """cluster/expert_group.ExpertGroup between three threads standing in for FFN workers: each gathers its own
    experts whole from the peers' slices, and the expert-parallel passes sum to the unsharded block."""
    from afdserve.cluster.expert_group import ExpertGroup
    world = 3
    block = _randomize(MoEBlock(H, E, 12)).to(dtype)
    x, routing = torch.randn(T, H, dtype=dtype), _routing()
    shards = [copy.deepcopy(block) for _ in range(world)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    outs, gathered, errors = [None] * world, [None] * world, []

    def worker(rank):
        try:
            group = ExpertGroup(rank, world, "127.0.0.1", port, timeout_s=60)
            shards[rank].shard_(rank, world)
            shards[rank].experts.gather = group.gather
            outs[rank] = shards[rank](x, routing)
            gathered[rank] = group.gather(shards[rank].experts)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for rank, (w13, w2) in enumerate(gathered):
        lo, hi = shard_range(E, rank, world)
        assert torch.equal(w13, block.experts.w13[lo:hi]) and torch.equal(w2, block.experts.w2[lo:hi])
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(sum(o.float() for o in outs), block(x, routing).float(), atol=tol, rtol=tol)


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
