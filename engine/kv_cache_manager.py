"""KV cache manager: which blocks each request holds, prefix-cache lookup, and slot allocation.

Prefix caching hashes full blocks only, each hash chained on its parent's:
    h_i = blake2b(h_{i-1} || tokens of block i)
so a hit on block i implies the whole prefix up to it matches.
"""
from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass

from afdserve.engine.block_pool import BlockHash, BlockPool, KVBlock
from afdserve.engine.request import Request


def hash_block(parent: BlockHash | None, token_ids: list[int]) -> BlockHash:
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"")
    h.update(array("q", token_ids).tobytes())
    return h.digest()


@dataclass
class PrefixHit:
    blocks: list[KVBlock]
    num_tokens: int


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.enable_prefix_caching = enable_prefix_caching
        self.req_blocks: dict[str, list[KVBlock]] = {}
        self._req_hashes: dict[str, list[BlockHash]] = {}
        self.prefix_queries = 0  # tokens looked up
        self.prefix_hits = 0  # tokens found

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, [])]

    def find_prefix(self, request: Request) -> PrefixHit:
        """Longest cached prefix of the request, in full blocks, leaving at least one token to compute.

        A request that wants prompt logprobs reads no cache: the skipped positions would have no logits."""
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return PrefixHit([], 0)
        hashes = self._hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hit: list[KVBlock] = []
        for block_hash in hashes[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hit.append(block)
        self.prefix_queries += request.num_tokens
        self.prefix_hits += len(hit) * self.block_size
        return PrefixHit(hit, len(hit) * self.block_size)

    def allocate_slots(self, request: Request, num_new_tokens: int, prefix: PrefixHit | None = None) -> bool:
        """Makes room for num_new_tokens more tokens of KV; False (and nothing changed) if the pool is short."""
        blocks = self.req_blocks.setdefault(request.request_id, [])
        hit_blocks = prefix.blocks if prefix else []
        num_computed = request.num_computed_tokens + (prefix.num_tokens if prefix else 0)
        total = num_computed + num_new_tokens
        num_needed = -(-total // self.block_size) - len(blocks) - len(hit_blocks)
        evictable_hits = sum(1 for b in hit_blocks if b.ref_cnt == 0)
        if num_needed > self.pool.num_free_blocks - evictable_hits:
            if not blocks:
                del self.req_blocks[request.request_id]
            return False
        self.pool.touch(hit_blocks)
        blocks.extend(hit_blocks)
        if num_needed > 0:
            blocks.extend(self.pool.allocate(num_needed))
        self._cache_full_blocks(request, blocks, total)
        return True

    def free(self, request: Request) -> None:
        blocks = self.req_blocks.pop(request.request_id, [])
        self.pool.free(list(reversed(blocks)))
        self._req_hashes.pop(request.request_id, None)

    def _hashes(self, request: Request) -> list[BlockHash]:
        """Chained hashes of the request's full blocks, extended incrementally as tokens arrive."""
        hashes = self._req_hashes.setdefault(request.request_id, [])
        bs = self.block_size
        while (len(hashes) + 1) * bs <= request.num_tokens:
            i = len(hashes)
            hashes.append(hash_block(hashes[-1] if hashes else None, request.all_token_ids[i * bs:(i + 1) * bs]))
        return hashes

    def _cache_full_blocks(self, request: Request, blocks: list[KVBlock], num_tokens: int) -> None:
        # Blocks become findable as soon as their tokens are scheduled: the step writes all K/V before any
        # attention reads, so a request scheduled in the same step may already share them.
        if not self.enable_prefix_caching:
            return
        hashes = self._hashes(request)
        for i in range(min(num_tokens // self.block_size, len(hashes))):
            self.pool.cache_full_block(blocks[i], hashes[i])
