"""KV cache manager: which blocks each request holds, prefix-cache lookup, and slot allocation.

For the int4 / saq KV formats it also keeps the staircase (engine/kv_staircase.py): which precision each block is
stored at. Allocating a request's slots for a step also plans its blocks' moves, and fails when the full-precision
pool cannot take the blocks the step writes, so the scheduler preempts or waits as it does for blocks.

Prefix caching hashes full blocks only, each hash chained on its parent's:
    h_i = blake2b(h_{i-1} || tokens of block i)
so a hit on block i implies the whole prefix up to it matches. A block whose KV an attention policy computed also
hashes the policy: KV from sparse or approximate attention is not dense KV (a layer's attention output feeds the next
layer's keys and values), so it is shared only with requests of the same policy. A decode-only policy's prompt
blocks are dense KV and shared with every request; a policy with a prefill of its own (HyperAttention) marks them all.
"""
from __future__ import annotations

import hashlib
import json
from array import array
from dataclasses import dataclass

from afdserve.engine.block_pool import BlockHash, BlockPool, KVBlock
from afdserve.engine.kv_staircase import KVStaircase, StairMove
from afdserve.engine.request import Request
from afdserve.kernels.attention.kv_tiers import KVCacheSpec
from afdserve.kernels.attention.sparse.registry import POLICIES


def hash_block(parent: BlockHash | None, token_ids: list[int], policy: dict | None = None) -> BlockHash:
    """policy: the attention policy that computed the block's KV; None: dense attention."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"")
    h.update(array("q", token_ids).tobytes())
    if policy is not None:
        h.update(json.dumps(policy, sort_keys=True).encode())
    return h.digest()


@dataclass
class PrefixHit:
    blocks: list[KVBlock]
    num_tokens: int


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool, spec: KVCacheSpec | None = None,
                 default_policy: dict | None = None):
        """default_policy: the engine's attention policy, for requests that name none (None: dense)."""
        self.block_size = block_size
        self.default_policy = default_policy
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.staircase = None
        if spec is not None and spec.stairs:
            self.staircase = KVStaircase(spec.stairs, spec.stair_slots, num_blocks, block_size, spec.max_seqs,
                                         in_use=lambda block: self.pool.blocks[block].ref_cnt > 0)
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

    @property
    def max_running_seqs(self) -> int | None:
        """Sequences the KV format can run at once beyond the block count (the staircase's pools); None: no limit."""
        return self.staircase.max_seqs if self.staircase else None

    def take_stair_moves(self) -> list[StairMove]:
        """The step's staircase moves, for the runner to replay (empty for formats without a staircase)."""
        return self.staircase.take_moves() if self.staircase else []

    def forget_all(self) -> None:
        """The KV cache's contents are gone (a replaced attention worker): no prefix is cached, every block is
        back on the staircase's floor as in a fresh cache."""
        self.pool.forget_cached()
        if self.staircase:
            self.staircase.reset()

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
        if num_needed > self.pool.num_free_blocks - evictable_hits or not self._window_room(
                blocks + hit_blocks, num_computed, num_new_tokens):
            if not blocks:
                del self.req_blocks[request.request_id]
            return False
        self.pool.touch(hit_blocks)
        blocks.extend(hit_blocks)
        if num_needed > 0:
            blocks.extend(self.pool.allocate(num_needed))
        self._cache_full_blocks(request, blocks, total)
        if self.staircase and num_new_tokens > 0:
            self.staircase.schedule([b.block_id for b in blocks], num_computed, num_new_tokens)
        return True

    def _window_room(self, blocks: list[KVBlock], start: int, num_tokens: int) -> bool:
        """Whether the staircase's full-precision pool can take the blocks this chunk writes (True without one)."""
        if self.staircase is None:
            return True
        table = [b.block_id for b in blocks]
        return self.staircase.has_window_room(self.staircase.blocks_to_open(table, start, num_tokens))

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
            hashes.append(hash_block(hashes[-1] if hashes else None, request.all_token_ids[i * bs:(i + 1) * bs],
                                     self._policy_of_block(request, i)))
        return hashes

    def _policy_of_block(self, request: Request, index: int) -> dict | None:
        """The attention policy that computes block `index`'s KV; None: dense attention."""
        policy = request.sampling_params.attention_policy or self.default_policy
        if policy is None or policy["name"] == "dense":
            return None
        holds_output = (index + 1) * self.block_size > request.num_prompt_tokens
        return policy if holds_output or POLICIES[policy["name"]].has_prefill else None

    def _cache_full_blocks(self, request: Request, blocks: list[KVBlock], num_tokens: int) -> None:
        # Blocks become findable as soon as their tokens are scheduled: the step writes all K/V before any
        # attention reads, so a request scheduled in the same step may already share them.
        if not self.enable_prefix_caching:
            return
        hashes = self._hashes(request)
        for i in range(min(num_tokens // self.block_size, len(hashes))):
            self.pool.cache_full_block(blocks[i], hashes[i])
