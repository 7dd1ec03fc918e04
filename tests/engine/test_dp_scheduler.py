"""Data-parallel attention's scheduler: one Scheduler and KV cache per attention rank, driven by the fake model.

Oracles: the fake model's outputs depend on a request's own history only (test_scheduler.reference_outputs), and a
shadow of every (rank, block, offset) slot checks that each chunk reads K/V from its own rank and token prefix.
"""
from __future__ import annotations

from test_scheduler import BS, check_no_leak, fake_token, make_request, prompt_of, reference_outputs

from afdserve.engine.config import SchedulerConfig
from afdserve.engine.dp_scheduler import DataParallelScheduler
from afdserve.engine.kv_cache_manager import KVCacheManager
from afdserve.engine.request_state import RequestStates
from afdserve.engine.scheduler import SchedulerOutput


def make_dp(ranks=2, num_blocks=32, budget=16, max_seqs=4) -> DataParallelScheduler:
    kvs = [KVCacheManager(num_blocks, BS, True) for _ in range(ranks)]
    return DataParallelScheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget), kvs, 1000)


def drive(dp: DataParallelScheduler, max_steps=2000) -> dict[str, set[int]]:
    """Runs to completion; returns each request's ranks over its life."""
    slots: dict[tuple[int, int, int], tuple[int, ...]] = {}
    ranks_of: dict[str, set[int]] = {}
    workers = [RequestStates() for _ in dp.ranks]  # what each attention worker rebuilds from its messages
    for _ in range(max_steps):
        if not dp.has_unfinished():
            return ranks_of
        out = dp.schedule()
        for rank in dp.ranks:  # the token budget and max_num_seqs hold per rank
            mine = [s for s in out.scheduled if s.rank == rank.rank]
            assert sum(s.num_tokens for s in mine) <= rank.config.max_num_batched_tokens
            assert len(rank.running) <= rank.config.max_num_seqs
        for rank, states in zip(dp.ranks, workers):  # each attention worker gets its rank's share of the step
            states.update(SchedulerOutput([s for s in out.scheduled if s.rank == rank.rank], out.finished_request_ids))
        for s in out.scheduled:
            ranks_of.setdefault(s.request_id, set()).add(s.rank)
            state = workers[s.rank][s.request_id]
            tokens = dp.requests[s.request_id].all_token_ids
            assert state.token_ids(0, state.num_tokens) == tokens
            assert state.block_ids == dp.ranks[s.rank].kv.block_ids(s.request_id)
            for p in range(s.start_pos, s.start_pos + s.num_tokens):
                slots[(s.rank, state.block_ids[p // BS], p % BS)] = tuple(tokens[:p + 1])
        for s in out.scheduled:
            blocks, tokens = workers[s.rank][s.request_id].block_ids, dp.requests[s.request_id].all_token_ids
            for p in range(s.start_pos + s.num_tokens):
                assert slots[(s.rank, blocks[p // BS], p % BS)] == tuple(tokens[:p + 1])
        sampled = [fake_token(dp.requests[s.request_id].all_token_ids) if s.samples else None for s in out.scheduled]
        dp.update_from_output(out.scheduled, sampled)
    raise AssertionError("the scheduler did not finish")


def test_requests_spread_over_ranks_stay_put_and_match_the_reference():
    dp = make_dp()
    requests = [make_request(f"r{i}", prompt_of(i, 3 + 5 * i), max_tokens=6 + i) for i in range(8)]
    for r in requests:
        dp.add_request(r)
    # A burst of arrivals alternates between the empty ranks (fewest requests breaks the KV-usage tie).
    assert [len(rank.requests) for rank in dp.ranks] == [4, 4]
    ranks_of = drive(dp)
    assert all(len(ranks) == 1 for ranks in ranks_of.values())
    for r in requests:
        assert r.output_token_ids == reference_outputs(r.prompt_token_ids, r.max_tokens)
    for rank in dp.ranks:
        check_no_leak(rank)


def test_new_requests_go_to_the_rank_with_less_kv_in_use():
    dp = make_dp(budget=64)
    dp.add_request(make_request("long", prompt_of(1, 40), max_tokens=50))  # rank 0: 10 of 32 blocks after a step
    dp.add_request(make_request("short", prompt_of(2, 4), max_tokens=50))  # rank 1: 1 block
    dp.update_from_output(*_step(dp))
    assert dp.ranks[0].kv.usage > dp.ranks[1].kv.usage
    for i in range(3):
        dp.add_request(make_request(f"new{i}", prompt_of(3 + i, 4), max_tokens=2))
    assert sorted(dp.ranks[1].requests) == ["new0", "new1", "new2", "short"]


def test_abort_and_stats_cover_every_rank():
    dp = make_dp()
    for i in range(4):
        dp.add_request(make_request(f"r{i}", prompt_of(i, 9), max_tokens=20))
    dp.update_from_output(*_step(dp))
    stats = dp.stats()
    assert (stats.num_running, stats.num_waiting) == (4, 0)
    assert stats.kv_usage == sum(rank.kv.usage for rank in dp.ranks) / 2 > 0
    assert {r.request_id for r in dp.abort(["r0", "r1", "r2", "r3", "unknown"])} == {"r0", "r1", "r2", "r3"}
    assert not dp.has_unfinished()
    for rank in dp.ranks:
        check_no_leak(rank)


def _step(dp: DataParallelScheduler):
    out = dp.schedule()
    return out.scheduled, [fake_token(dp.requests[s.request_id].all_token_ids) if s.samples else None
                           for s in out.scheduled]
