"""BlockPool and KVCacheManager against hand-checked invariants and a shadow model of what each KV slot holds.

The shadow oracle: a slot written at position p of a sequence holds K/V that depend on tokens[:p + 1], so a
prefix hit is right only if every hit slot was written for exactly the same token prefix.
"""
from __future__ import annotations

import random

import pytest

from afdserve.engine.block_pool import BlockPool
from afdserve.engine.kv_cache_manager import KVCacheManager
from afdserve.engine.request import Request
from afdserve.engine.sampling_params import SamplingParams

BS = 4


def make_request(rid: str, tokens: list[int], **params) -> Request:
    return Request(rid, tokens, SamplingParams(**params), max_tokens=100)


def check_pool_invariants(pool: BlockPool) -> None:
    free_ids = [b.block_id for b in pool.blocks if b.ref_cnt == 0]
    assert sorted(free_ids) == sorted(pool._free), "the free queue must hold exactly the blocks with ref_cnt 0"
    assert all(b.ref_cnt >= 0 for b in pool.blocks)
    for block_hash, block in pool._cached.items():
        assert block.block_hash == block_hash


def check_no_leak(kv: KVCacheManager) -> None:
    assert kv.num_free_blocks == kv.pool.num_blocks
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)
    assert not kv.req_blocks


# ---- BlockPool ----------------------------------------------------------------------------------------------

def test_pool_allocate_and_free_counts():
    pool = BlockPool(5, enable_caching=True)
    blocks = pool.allocate(3)
    assert len({b.block_id for b in blocks}) == 3
    assert all(b.ref_cnt == 1 for b in blocks)
    assert pool.num_free_blocks == 2
    assert pool.usage == pytest.approx(3 / 5)
    with pytest.raises(RuntimeError):
        pool.allocate(3)
    assert pool.num_free_blocks == 2, "a failed allocate must take nothing"
    pool.free(blocks)
    assert pool.num_free_blocks == 5
    check_pool_invariants(pool)
    with pytest.raises(AssertionError):
        pool.free(blocks[:1])


def test_pool_reuses_least_recently_freed_first():
    pool = BlockPool(4, enable_caching=True)
    a, b, c, d = pool.allocate(4)
    for block in (c, a, d, b):
        pool.free([block])
    assert [x.block_id for x in pool.allocate(4)] == [c.block_id, a.block_id, d.block_id, b.block_id]


def test_freed_cached_block_stays_findable_until_reused():
    pool = BlockPool(2, enable_caching=True)
    x, y = pool.allocate(2)
    pool.cache_full_block(x, b"hx")
    pool.free([x, y])  # x freed first: x is at the LRU head
    assert pool.lookup(b"hx") is x
    pool.touch([x])  # a hit takes it out of the free queue
    assert x.ref_cnt == 1 and pool.num_free_blocks == 1
    pool.free([x])
    assert pool.lookup(b"hx") is x
    [z] = pool.allocate(1)  # y is older in the queue now
    assert z is y and pool.lookup(b"hx") is x
    [w] = pool.allocate(1)
    assert w is x and w.block_hash is None and pool.lookup(b"hx") is None
    check_pool_invariants(pool)


def test_touch_shares_a_block():
    pool = BlockPool(3, enable_caching=True)
    [x] = pool.allocate(1)
    pool.touch([x])
    assert x.ref_cnt == 2 and pool.num_free_blocks == 2
    pool.free([x])
    assert x.ref_cnt == 1 and pool.num_free_blocks == 2
    pool.free([x])
    assert x.ref_cnt == 0 and pool.num_free_blocks == 3


def test_pool_without_caching_finds_nothing():
    pool = BlockPool(2, enable_caching=False)
    [x] = pool.allocate(1)
    pool.cache_full_block(x, b"h")
    assert pool.lookup(b"h") is None


# ---- KVCacheManager: prefix lookup --------------------------------------------------------------------------

def admit(kv: KVCacheManager, request: Request, budget: int | None = None) -> int:
    """Looks up and allocates like the scheduler admitting a waiting request; returns the hit length."""
    hit = kv.find_prefix(request)
    n = request.num_tokens - hit.num_tokens if budget is None else min(budget, request.num_tokens - hit.num_tokens)
    assert kv.allocate_slots(request, n, hit)
    request.num_computed_tokens = hit.num_tokens + n
    return hit.num_tokens


@pytest.mark.parametrize("prompt_len, expected_hit", [
    (3, 0),  # no full block
    (4, 0),  # one full block, but one token must be left to compute
    (5, 4),
    (8, 4),  # exactly two blocks: the last one is recomputed
    (9, 8),
    (11, 8),
])
def test_find_prefix_full_blocks_leaving_one_token(prompt_len, expected_hit):
    kv = KVCacheManager(16, BS, enable_prefix_caching=True)
    tokens = list(range(100, 100 + prompt_len))
    admit(kv, make_request("a", tokens))
    b = make_request("b", tokens)
    assert admit(kv, b) == expected_hit
    assert b.num_computed_tokens == prompt_len


def test_partial_block_is_not_cached():
    kv = KVCacheManager(16, BS, enable_prefix_caching=True)
    admit(kv, make_request("a", list(range(6))))  # one full block, then 2 tokens
    assert admit(kv, make_request("b", list(range(6)) + [6, 7, 8])) == 4


def test_chained_hash_needs_the_whole_prefix():
    kv = KVCacheManager(16, BS, enable_prefix_caching=True)
    admit(kv, make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    # Same second block, different first block: block 2's hash must not match.
    assert admit(kv, make_request("b", [0, 2, 3, 4, 5, 6, 7, 8, 9])) == 0
    assert admit(kv, make_request("c", [1, 2, 3, 4, 5, 6, 7, 0, 9])) == 4
    # Block [5, 6, 7, 8] is cached after [1, 2, 3, 4] only; after [9, 9, 9, 9] it is another block's K/V.
    admit(kv, make_request("d", [9, 9, 9, 9, 0]))
    assert admit(kv, make_request("e", [9, 9, 9, 9, 5, 6, 7, 8, 0])) == 4


QUEST = {"name": "quest", "budget_pages": 4}
HYPER = {"name": "hyperattention", "min_seq_len": 0}


def decode(kv: KVCacheManager, request: Request, tokens: list[int]) -> None:
    """Appends generated tokens one decode step at a time, as the scheduler does."""
    for token in tokens:
        request.append_output_token(token)
        assert kv.allocate_slots(request, 1)
        request.num_computed_tokens += 1


def test_a_decode_only_policy_shares_its_prompt_blocks_but_not_the_blocks_it_generated():
    # A sparse decode policy reads a dense prompt KV, so prompt blocks are shared both ways; a block holding tokens
    # its sparse decodes wrote is another KV than dense decodes would write.
    kv = KVCacheManager(32, BS, enable_prefix_caching=True)
    prompt = list(range(40, 49))  # two full blocks and one token
    a = make_request("a", prompt, attention_policy=QUEST)
    admit(kv, a)
    decode(kv, a, [7, 7, 7])  # the third block now holds a prompt token and three generated ones
    assert admit(kv, make_request("dense", prompt)) == 8
    # Those tokens as a prompt are prefilled densely, by any request: a's block is not their KV...
    assert admit(kv, make_request("quest-long", prompt + [7, 7, 7, 0], attention_policy=QUEST)) == 8
    # ...and the dense KV of that block, once computed, is every request's.
    assert admit(kv, make_request("quest-again", prompt + [7, 7, 7, 0, 1], attention_policy=QUEST)) == 12
    assert admit(kv, make_request("dense-long", prompt + [7, 7, 7, 0])) == 12


def test_a_policy_with_its_own_prefill_shares_blocks_only_with_its_own_kind():
    kv = KVCacheManager(32, BS, enable_prefix_caching=True)
    prompt = list(range(60, 69))
    admit(kv, make_request("dense", prompt))
    assert admit(kv, make_request("hyper", prompt, attention_policy=HYPER)) == 0
    assert admit(kv, make_request("hyper-again", prompt, attention_policy=HYPER)) == 8
    # The engine's own policy applies to requests that name none; naming dense is then another KV.
    kv = KVCacheManager(32, BS, enable_prefix_caching=True, default_policy=HYPER)
    admit(kv, make_request("default", prompt))
    assert admit(kv, make_request("named", prompt, attention_policy=HYPER)) == 8
    assert admit(kv, make_request("dense", prompt, attention_policy={"name": "dense"})) == 0


def test_prompt_logprobs_and_disabled_caching_skip_the_cache():
    kv = KVCacheManager(16, BS, enable_prefix_caching=True)
    tokens = list(range(20, 33))
    admit(kv, make_request("a", tokens))
    assert admit(kv, make_request("b", tokens, prompt_logprobs=0)) == 0
    kv_off = KVCacheManager(16, BS, enable_prefix_caching=False)
    admit(kv_off, make_request("a", tokens))
    assert admit(kv_off, make_request("b", tokens)) == 0


def test_prefix_counters():
    kv = KVCacheManager(16, BS, enable_prefix_caching=True)
    tokens = list(range(13))
    admit(kv, make_request("a", tokens))
    admit(kv, make_request("b", tokens))
    assert kv.prefix_queries == 26
    assert kv.prefix_hits == 12


def test_shared_blocks_ref_counts_and_release():
    kv = KVCacheManager(8, BS, enable_prefix_caching=True)
    tokens = list(range(10))
    a, b = make_request("a", tokens), make_request("b", tokens)
    admit(kv, a)
    admit(kv, b)  # n > 1 children: the second one shares the first one's full prompt blocks
    shared = kv.req_blocks["a"][:2]
    assert kv.req_blocks["b"][:2] == shared
    assert [blk.ref_cnt for blk in shared] == [2, 2]
    assert kv.req_blocks["a"][2] is not kv.req_blocks["b"][2], "the partial block is private"
    assert kv.num_free_blocks == 8 - 4
    kv.free(a)
    assert [blk.ref_cnt for blk in shared] == [1, 1]
    kv.free(b)
    check_no_leak(kv)
    c = make_request("c", tokens)
    assert admit(kv, c) == 8, "freed blocks keep their prefix until reused"
    assert [blk.ref_cnt for blk in kv.req_blocks["c"][:2]] == [1, 1]
    kv.free(c)
    check_no_leak(kv)


def test_free_evicts_the_tail_first():
    kv = KVCacheManager(3, BS, enable_prefix_caching=True)
    a = make_request("a", list(range(12)))
    admit(kv, a)
    first, second, third = kv.req_blocks["a"]
    kv.free(a)
    [reused] = kv.pool.allocate(1)
    assert reused is third
    assert kv.pool.lookup(first.block_hash) is first and kv.pool.lookup(second.block_hash) is second


def test_allocate_slots_fails_without_changes_when_short():
    # 4 blocks: a 2-block cached prefix (free, evictable) plus 2 free blocks.
    kv = KVCacheManager(4, BS, enable_prefix_caching=True)
    prefix = list(range(8))
    a = make_request("a", prefix + [50])
    admit(kv, a)
    kv.free(a)
    # b needs the 2 hit blocks + 3 new ones (8 hit + 9 new tokens = 17 tokens = 5 blocks): one too many.
    b = make_request("b", prefix + list(range(60, 69)))
    hit = kv.find_prefix(b)
    assert hit.num_tokens == 8
    before = [(blk.ref_cnt, blk.block_hash) for blk in kv.pool.blocks]
    assert not kv.allocate_slots(b, 9, hit)
    assert [(blk.ref_cnt, blk.block_hash) for blk in kv.pool.blocks] == before
    assert kv.num_free_blocks == 4 and "b" not in kv.req_blocks
    assert kv.find_prefix(b).num_tokens == 8, "the failed attempt must not evict the prefix"
    # 8 new tokens fit exactly: 2 hit blocks + 2 new ones.
    assert kv.allocate_slots(b, 8, hit)
    assert kv.num_free_blocks == 0 and len(kv.req_blocks["b"]) == 4
    kv.free(b)
    check_no_leak(kv)


def test_running_request_grows_block_by_block():
    kv = KVCacheManager(4, BS, enable_prefix_caching=True)
    r = make_request("r", [1, 2, 3])
    admit(kv, r)
    assert len(kv.req_blocks["r"]) == 1
    for tok in range(10, 23):
        r.append_output_token(tok)
        assert kv.allocate_slots(r, 1)
        r.num_computed_tokens += 1
        assert len(kv.req_blocks["r"]) == -(-r.num_tokens // BS)
    assert r.num_tokens == 16 and kv.num_free_blocks == 0
    r.append_output_token(99)
    assert not kv.allocate_slots(r, 1)
    assert len(kv.req_blocks["r"]) == 4, "a failed grow keeps the request's blocks"
    kv.free(r)
    check_no_leak(kv)


# ---- randomized: shadow KV contents -------------------------------------------------------------------------

class ShadowKV:
    """What each slot holds: the token prefix its K/V was computed from."""

    def __init__(self, num_blocks: int):
        self.slots: list[list[tuple | None]] = [[None] * BS for _ in range(num_blocks)]

    def write(self, kv: KVCacheManager, request: Request, start: int, n: int) -> None:
        blocks = kv.req_blocks[request.request_id]
        for p in range(start, start + n):
            block = blocks[p // BS]
            assert block.ref_cnt == 1, "a shared block must never be written"
            self.slots[block.block_id][p % BS] = tuple(request.all_token_ids[:p + 1])

    def check(self, kv: KVCacheManager, request: Request, upto: int) -> None:
        blocks = kv.req_blocks[request.request_id]
        assert len(blocks) * BS >= upto
        for p in range(upto):
            held = self.slots[blocks[p // BS].block_id][p % BS]
            assert held == tuple(request.all_token_ids[:p + 1]), f"{request.request_id} reads wrong KV at {p}"


@pytest.mark.parametrize("seed", range(4))
def test_random_workload_hits_are_correct_and_nothing_leaks(seed):
    rng = random.Random(seed)
    num_blocks = 24
    kv = KVCacheManager(num_blocks, BS, enable_prefix_caching=True)
    shadow = ShadowKV(num_blocks)
    # Prompts are sequences of a few block-sized words, so one block's tokens recur after different prefixes.
    words = [[rng.randrange(3) for _ in range(BS)] for _ in range(3)]
    live: list[Request] = []
    total_hits = 0
    for step in range(300):
        op = rng.random()
        if op < 0.3 and len(live) < 6:
            tokens = [t for _ in range(rng.randrange(1, 4)) for t in rng.choice(words)]
            tokens += [rng.randrange(3) for _ in range(rng.randrange(0, 4))]
            r = make_request(f"r{step}", tokens, prompt_logprobs=0 if rng.random() < 0.1 else None)
            hit = kv.find_prefix(r)
            assert hit.num_tokens % BS == 0 and hit.num_tokens < r.num_tokens
            n = min(rng.randrange(1, 12), r.num_tokens - hit.num_tokens)
            if kv.allocate_slots(r, n, hit):
                total_hits += hit.num_tokens
                r.num_computed_tokens = hit.num_tokens
                shadow.check(kv, r, hit.num_tokens)
                shadow.write(kv, r, hit.num_tokens, n)
                r.num_computed_tokens += n
                live.append(r)
        elif op < 0.85 and live:
            r = rng.choice(live)
            if r.num_computed_tokens == r.num_tokens:
                r.append_output_token(rng.randrange(3))
            n = min(rng.randrange(1, 6), r.num_tokens - r.num_computed_tokens)
            if kv.allocate_slots(r, n):
                shadow.write(kv, r, r.num_computed_tokens, n)
                r.num_computed_tokens += n
                shadow.check(kv, r, r.num_computed_tokens)
        elif live:
            r = live.pop(rng.randrange(len(live)))
            kv.free(r)
        check_pool_invariants(kv.pool)
        held = sum(len(kv.req_blocks[r.request_id]) for r in live)
        assert held == sum(b.ref_cnt for b in kv.pool.blocks)
    assert total_hits > 0, "the workload should exercise prefix hits"
    for r in live:
        kv.free(r)
    check_no_leak(kv)
