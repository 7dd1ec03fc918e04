"""The expert cache's eviction policies (models/layers/expert_cache.py): Belady's against the optimum found by trying
every eviction on small traces, never below LRU on any trace, and LRU against a plain ordered-dict LRU."""
from __future__ import annotations

from collections import OrderedDict
from functools import lru_cache

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
