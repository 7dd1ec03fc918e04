"""The expert cache (models/layers/expert_cache.py). Its eviction policies: Belady's against the optimum found by
trying every eviction on small traces, never below LRU on any trace, and LRU against a plain ordered-dict LRU. The
cache that holds the weights: passes through it against the naive MoE over all experts, and an engine with part of
a Read-ME model's experts resident against the engine with all of them."""
from __future__ import annotations

from collections import OrderedDict
from functools import lru_cache

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from afdserve.models.layers.expert_cache import LRU, Belady, simulate, step_accesses

traces = st.lists(st.integers(0, 5), min_size=1, max_size=40)


def fewest_misses(trace: tuple[int, ...], capacity: int) -> int:
    """The least misses any eviction choices give, by trying them all."""
    @lru_cache(maxsize=None)
    def best(now: int, resident: frozenset[int]) -> int:
        if now == len(trace):
            return 0
        expert = trace[now]
        if expert in resident:
            return best(now + 1, resident)
        if len(resident) < capacity:
            return 1 + best(now + 1, resident | {expert})
        return 1 + min(best(now + 1, (resident - {victim}) | {expert}) for victim in resident)
    return best(0, frozenset())


def plain_lru_hits(trace, capacity: int) -> int:
    cache, hits = OrderedDict(), 0
    for expert in trace:
        if expert in cache:
            hits += 1
            cache.move_to_end(expert)
        else:
            if len(cache) == capacity:
                cache.popitem(last=False)
            cache[expert] = True
    return hits


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=12), st.integers(1, 3))
def test_belady_with_the_whole_future_is_optimal(trace, capacity):
    assert simulate(trace, capacity, Belady()).misses == fewest_misses(tuple(trace), capacity)


@settings(max_examples=300, deadline=None)
@given(traces, st.integers(1, 5))
def test_belady_never_hits_less_than_lru(trace, capacity):
    assert simulate(trace, capacity, Belady()).hits >= simulate(trace, capacity, LRU()).hits


@settings(max_examples=200, deadline=None)
@given(traces, st.integers(1, 5))
def test_lru_is_least_recently_used(trace, capacity):
    assert simulate(trace, capacity, LRU()).hits == plain_lru_hits(trace, capacity)


def test_a_step_asks_for_its_distinct_experts_in_order():
    assert step_accesses([[3, 1, 3], [0], [2, 2]]) == [1, 3, 0, 2]
    trace = [0, 1, 2, 0, 1, 2, 3, 0]
    # By hand: 0 1 2(evicts 1) 0 1(evicts 0) 2 3(evicts 1) 0: six misses.
    assert simulate(trace, 2, Belady()).misses == fewest_misses(tuple(trace), 2) == 6
    # Blind (no lookahead), Belady is LRU.
    assert simulate(trace, 2, Belady(), lookahead=0) == simulate(trace, 2, LRU())


@settings(max_examples=200, deadline=None)
@given(traces, st.integers(1, 5))
def test_belady_without_a_lookahead_is_lru(trace, capacity):
    assert simulate(trace, capacity, Belady(), lookahead=0) == simulate(trace, capacity, LRU())


# ---- the cache that holds the weights (ExpertCache, --expert-cache-size) -------------------------------------------
def _expert_weights(num_experts=6, hidden=16, inter=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(num_experts, 2 * inter, hidden, generator=gen) * 0.3,
            torch.randn(num_experts, hidden, inter, generator=gen) * 0.3)


@torch.inference_mode()
@pytest.mark.parametrize("policy", ["lru", "belady"])
@pytest.mark.parametrize("capacity", [1, 2, 4, 6])
def test_a_pass_through_the_cache_equals_the_whole_experts(tmp_path, policy, capacity):
    """Oracle: the naive per-token MoE over all experts in memory, for passes needing more experts than fit."""
    from afdserve.kernels.moe import fused_experts_torch, moe_reference
    from afdserve.models.layers.expert_cache import ExpertCache, make_policy
    w13, w2 = _expert_weights()
    cache = ExpertCache(w13, w2, capacity, make_policy(policy), tmp_path)
    gen = torch.Generator().manual_seed(1)
    accesses = 0
    for step in range(5):
        x = torch.randn(9, 16, generator=gen)
        ids = torch.randint(0, 6, (9, 2), generator=gen)
        weights = torch.rand(9, 2, generator=gen)
        out, counts = cache.run(x, ids, weights, fused_experts_torch)
        torch.testing.assert_close(out, moe_reference(x, w13, w2, ids, weights), atol=1e-5, rtol=1e-5)
        assert counts.tolist() == torch.bincount(ids.reshape(-1), minlength=6).tolist()
        accesses += len(set(ids.reshape(-1).tolist()))
    assert cache.stats.hits + cache.stats.misses == accesses  # one access per distinct expert of a pass
    assert len(cache.slot_of) <= capacity and cache.w13.shape[0] == capacity
    if capacity == 6:  # everything fits: only the first use of each expert misses
        assert cache.stats.misses == 6


def test_the_policies_evict_as_they_say(tmp_path):
    """Two slots, passes needing {0, 1}, then {2}, then {0, 3}: when 2 arrives, LRU evicts 0 (used longest ago);
    Belady sees 0 and 3 ahead in no pass yet, so it evicts by LRU too; within the last pass it keeps 0 (needed now)."""
    from afdserve.kernels.moe import fused_experts_torch
    from afdserve.models.layers.expert_cache import ExpertCache, make_policy
    w13, w2 = _expert_weights()
    x = torch.randn(2, 16)
    for policy in ("lru", "belady"):
        cache = ExpertCache(w13, w2, 2, make_policy(policy), tmp_path / policy)
        for experts in ([0, 1], [2, 2], [0, 3]):
            ids = torch.tensor([[experts[0]], [experts[1]]])
            cache.run(x, ids, torch.ones(2, 1), fused_experts_torch)
            if experts == [2, 2]:
                assert set(cache.slot_of) == {1, 2}
        assert set(cache.slot_of) == {0, 3} and (cache.stats.hits, cache.stats.misses) == (0, 5)


def test_the_offloaded_experts_live_in_a_memory_mapped_file(tmp_path):
    from afdserve.models.layers.expert_cache import ExpertCache, LRU
    w13, w2 = _expert_weights()
    cache = ExpertCache(w13, w2, 2, LRU(), tmp_path)
    assert (tmp_path / "w13.bin").stat().st_size == w13.numel() * 4
    assert torch.equal(cache.store_w13, w13) and torch.equal(cache.store_w2, w2)
    with pytest.raises(ValueError, match=r"expert cache size must be in \[1, 6\]"):
        ExpertCache(w13, w2, 7, LRU(), tmp_path / "too-big")


@pytest.mark.parametrize("policy", ["lru", "belady"])
def test_an_engine_with_two_of_four_experts_resident_gives_the_same_tokens(tmp_path, policy):
    """A tiny Read-ME model (top-2 of 4 experts) with every expert resident, and with 2 resident and the pre-gating
    router's prefetch: the same greedy tokens and logprobs; the cache missed and hit."""
    from afdserve import LLM, SamplingParams
    from conftest import make_tiny_readme
    _, out, _ = make_tiny_readme(tmp_path, top_k=2)
    prompts = [list(range(3, 40)), [9, 4, 200, 31], list(range(50, 70))]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)
    with LLM(str(out), dtype="float32", block_size=8) as llm:
        expected = llm.generate(prompts, params, use_tqdm=False)
    with LLM(str(out), dtype="float32", block_size=8, expert_cache_size=2, expert_cache_policy=policy) as llm:
        got = llm.generate(prompts, params, use_tqdm=False)
        caches = [layer.mlp.experts.cache for layer in llm.engine.core.executor.runner.model.layers]
    for a, b in zip(expected, got):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert all(abs(x[t].logprob - y[t].logprob) < 1e-4 for t in x)
    assert all(c.stats.misses > 2 and c.stats.hits > 0 for c in caches)


def test_expert_cache_settings_are_checked():
    from afdserve.engine.config import ModelConfig, engine_config
    with pytest.raises(ValueError, match="expert_cache_policy: set, but read only with expert_cache_size"):
        ModelConfig(device="cpu", expert_cache_policy="lru")
    with pytest.raises(ValueError, match="expert_cache_size must be >= 1"):
        ModelConfig(device="cpu", expert_cache_size=0)
    with pytest.raises(ValueError, match="FFN sharding slices"):
        engine_config(device="cpu", expert_cache_size=2, afd="1A2F")


def test_the_caches_counts_reach_the_engine_stats_and_metrics(tmp_path):
    """core.stats().expert_cache sums the layers' caches; /metrics shows the same counts."""
    from afdserve import LLM, SamplingParams
    from afdserve.engine.server.metrics import ServerMetrics
    from conftest import make_tiny_readme
    _, out, _ = make_tiny_readme(tmp_path, top_k=2)
    with LLM(str(out), dtype="float32", block_size=8, expert_cache_size=2) as llm:
        llm.generate([list(range(3, 30))], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                     use_tqdm=False)
        caches = [layer.mlp.experts.cache for layer in llm.engine.core.executor.runner.model.layers]
        totals = llm.engine.core.stats().expert_cache
        assert totals.hits == sum(c.stats.hits for c in caches) and totals.misses == sum(c.stats.misses for c in caches)
        assert totals.misses > 0 and totals.load_seconds > 0
        text = ServerMetrics("m", llm.engine.core.stats).render().decode()
    assert f'afdserve:expert_cache_misses_total{{model_name="m"}} {float(totals.misses)}' in text
    assert f'afdserve:expert_cache_hits_total{{model_name="m"}} {float(totals.hits)}' in text
    with LLM(str(out), dtype="float32", block_size=8) as llm:
        assert llm.engine.core.stats().expert_cache is None
