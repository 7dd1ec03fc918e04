"""Data-parallel attention (AFD xAyF with x > 1): one Scheduler and KV cache per attention rank, stepped together.

Each attention worker owns disjoint requests and its own KV cache, so each rank has its own Scheduler over its own
KVCacheManager (block ids are per rank). A request is placed once, on the rank with the least KV in use, and lives
there until it finishes. Every step schedules all ranks; the merged output carries each request's rank so the
executor can send each attention worker its share. Token budget and max_num_seqs apply per rank, as in vLLM's and
SGLang's DP attention.

Same interface as Scheduler, so EngineCore does not know how many ranks there are.
"""
from __future__ import annotations

from collections import ChainMap

from afdserve.engine.config import SchedulerConfig
from afdserve.engine.kv_cache_manager import KVCacheManager
from afdserve.engine.request import Request, RequestStatus
from afdserve.engine.scheduler import ScheduledRequest, Scheduler, SchedulerOutput, SchedulerStats


class DataParallelScheduler:
    def __init__(self, config: SchedulerConfig, kv_managers: list[KVCacheManager], max_model_len: int):
        self.ranks = [Scheduler(config, kv, max_model_len, rank) for rank, kv in enumerate(kv_managers)]
        self.requests = ChainMap(*(rank.requests for rank in self.ranks))  # a live view over every rank's requests

    def _rank_of(self, request_id: str) -> Scheduler | None:
        return next((rank for rank in self.ranks if request_id in rank.requests), None)

    def add_request(self, request: Request) -> None:
        # Least KV in use; among equals the fewest requests, so a burst of arrivals spreads out before any has blocks.
        target = min(self.ranks, key=lambda s: (s.kv.usage, len(s.requests)))
        target.add_request(request)

    def has_unfinished(self) -> bool:
        return any(rank.has_unfinished() for rank in self.ranks)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        for rank in self.ranks:
            part = rank.schedule()
            out.scheduled += part.scheduled
            out.finished_request_ids |= part.finished_request_ids
            out.kv_moves.update(part.kv_moves)
        return out

    def update_from_output(self, scheduled: list[ScheduledRequest], sampled: list[int | None]) -> list[Request]:
        updated = []
        for rank in self.ranks:
            mine = [(item, token) for item, token in zip(scheduled, sampled) if item.rank == rank.rank]
            if mine:
                items, tokens = zip(*mine)
                updated += rank.update_from_output(list(items), list(tokens))
        return updated

    def finish(self, request: Request, status: RequestStatus) -> None:
        rank = self._rank_of(request.request_id)
        if rank is not None:
            rank.finish(request, status)

    def recover_from_worker_failure(self) -> list[Request]:
        return [r for rank in self.ranks for r in rank.recover_from_worker_failure()]

    def abort(self, request_ids: list[str]) -> list[Request]:
        return [r for rank in self.ranks for r in rank.abort(request_ids)]  # a rank skips ids it does not hold

    @property
    def num_preemptions(self) -> int:
        return sum(rank.num_preemptions for rank in self.ranks)

    def stats(self) -> SchedulerStats:
        parts = [rank.stats() for rank in self.ranks]
        return SchedulerStats(
            num_running=sum(p.num_running for p in parts),
            num_waiting=sum(p.num_waiting for p in parts),
            kv_usage=sum(p.kv_usage for p in parts) / len(parts),  # ranks have equal pools
            num_preemptions=sum(p.num_preemptions for p in parts),
            prefix_queries=sum(p.prefix_queries for p in parts),
            prefix_hits=sum(p.prefix_hits for p in parts),
        )
