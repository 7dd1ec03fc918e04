"""The int4 / saq staircase beside the block pool (engine/kv_staircase.py): the moves it plans, replayed by the
runner's view into a layer's QuantizedKVCache, against the quantizers' formulas (KIVI, arXiv:2402.02750; SAQ,
arXiv:2410.18441); and the scheduler seeing its capacity."""
import math
import random

import pytest
import torch

from conftest import ref_minmax
from afdserve.engine.config import SchedulerConfig, parse_staircase
from afdserve.engine.kv_cache_manager import KVCacheManager
from afdserve.engine.kv_staircase import KVStaircase
from afdserve.engine.request import Request
from afdserve.engine.sampling_params import SamplingParams
from afdserve.engine.scheduler import Scheduler
from afdserve.kernels.attention.kv_quant import KVShape, QuantizedKVCache
from afdserve.kernels.attention.kv_tiers import KVCacheSpec, KVStairView, kv_cache_spec

SHAPE = KVShape(num_kv_heads=2, block_size=16, head_dim=64, dtype=torch.float32)


def kivi_block(x: torch.Tensor, bits: int) -> torch.Tensor:
    """A [2, kvh, 16, 64] block as KIVI stores it: keys per channel over the block, values per token in groups of 32."""
    return torch.stack([ref_minmax(x[0], bits, 1),
                        ref_minmax(x[1].reshape(2, -1, 2, 32), bits, -1).reshape(2, -1, 64)])


class Layer:
    """A staircase (the scheduler's side) and a view plus one layer's cache (the runner's side), stepped together
    as the engine steps them: plan, send the moves, replay, write at the view's slots."""

    def __init__(self, stairs, stair_slots, num_blocks=16, in_use=lambda block: True):
        self.staircase = KVStaircase(tuple(stairs), tuple(stair_slots), num_blocks, SHAPE.block_size, max_seqs=2,
                                     in_use=in_use)
        self.view = KVStairView(num_blocks, floor=len(stairs) - 1)
        self.cache = QuantizedKVCache(SHAPE, "saq", num_blocks, [b for _, b in stairs], list(stair_slots))

    def step(self, seqs: list[tuple[list[int], int, torch.Tensor]]):
        """seqs: (block table, first new position, new K = V [n, kvh, hd]) per sequence."""
        for table, start, kv in seqs:
            self.staircase.schedule(table, start, len(kv))
        plan = self.view.replay(self.staircase.take_moves())
        bs = SHAPE.block_size
        slots = torch.tensor([self.view.slot[table[p // bs]] * bs + p % bs
                              for table, start, kv in seqs for p in range(start, start + len(kv))])
        kv = torch.cat([kv for _, _, kv in seqs])
        self.cache.write(kv, kv, slots, plan)
        return plan

    def gather(self, blocks: list[int]) -> torch.Tensor:
        return self.cache.gather(torch.tensor(blocks))


class Sequence:
    """One sequence written through a Layer step by step."""

    def __init__(self, stairs, num_blocks=16):
        spec = kv_cache_spec("saq", SHAPE, 1, stairs[0][0], stairs, max_num_seqs=2, max_num_batched_tokens=128,
                             budget_bytes=2 ** 30)
        self.layer = Layer(spec.stairs, spec.stair_slots, num_blocks)
        self.blocks = torch.randperm(num_blocks).tolist()  # scattered physical blocks
        self.kv = torch.randn(0, 2, 64)

    def step(self, n: int):
        new = torch.randn(n, 2, 64)
        start, self.kv = len(self.kv), torch.cat([self.kv, new])
        return self.layer.step([(self.blocks, start, new)])

    def gathered(self) -> torch.Tensor:
        n = len(self.kv)
        return self.layer.gather(self.blocks[:-(-n // SHAPE.block_size)])[:, :, :n]  # [2, kvh, n, hd]

    def truth(self) -> torch.Tensor:
        return torch.stack([self.kv, self.kv]).transpose(1, 2)

    def stair(self, logical_block: int) -> int:
        return self.layer.staircase.stair[self.blocks[logical_block]]


# ---- the staircase through a layer's cache ----------------------------------------------------------------------
@pytest.mark.parametrize("chunks", [[1] * 100, [40, 1, 1, 30, 17, 5, 1, 1, 4]])
def test_int4_window_is_exact_and_older_blocks_are_kivi(chunks):
    window, bs = 32, SHAPE.block_size
    seq = Sequence([(window, 16), (math.inf, 4)])
    for n in chunks:
        start = len(seq.kv)
        seq.step(n)
        L = len(seq.kv)
        got, truth = seq.gathered(), seq.truth()
        # A block steps down at the request's step after its age (tokens after it in the KV) reaches the window.
        n_quant = max(0, (start - window) // bs)
        assert torch.equal(got[:, :, n_quant * bs:], truth[:, :, n_quant * bs:])
        assert L - n_quant * bs >= min(L, window)  # so the newest `window` tokens are always exact
        for b in range(n_quant):
            blk = truth[:, :, b * bs:(b + 1) * bs]
            assert torch.allclose(got[:, :, b * bs:(b + 1) * bs], kivi_block(blk, 4), atol=1e-5), (L, b)
            assert not torch.equal(got[:, :, b * bs:(b + 1) * bs], blk)


def test_saq_steps_whole_blocks_down_at_the_configured_ages():
    seq = Sequence(parse_staircase("32:16,64:8,96:4,inf:2"))
    history = []  # (length, stair of logical block 0, its gathered values)
    for _ in range(130):
        seq.step(1)
        history.append((len(seq.kv), seq.stair(0), seq.gathered()[:, :, :16].clone()))
    # Block 0 holds tokens 0..15; at the step that brings the length to L its age is L - 1 - 16: stair k once that
    # reaches stair k-1's bound.
    first_at = {s: next(L for L, st, _ in history if st == s) for s in (0, 1, 2, 3)}
    assert first_at == {0: 1, 1: 17 + 32, 2: 17 + 64, 3: 17 + 96}
    assert [st for _, st, _ in history] == sorted(st for _, st, _ in history)  # only ever down
    blk = seq.truth()[:, :, :16]
    # Each step re-quantizes the whole block from the previous stair's dequantized values.
    expected = {0: blk, 1: kivi_block(blk, 8)}
    expected[2] = kivi_block(expected[1], 4)
    expected[3] = kivi_block(expected[2], 2)
    for L, st, values in history:
        assert torch.allclose(values, expected[st][:, :, :L], atol=1e-5), (L, st)

    def half_steps(x, bits):  # drift from re-quantizing is bounded by the sum of each stair's half step
        return (x.amax(2, keepdim=True) - x.amin(2, keepdim=True))[0] / (2 ** bits - 1) / 2
    drift = (expected[3][0] - blk[0]).abs()
    assert (drift <= half_steps(blk, 8) + half_steps(expected[1], 4) + half_steps(expected[2], 2) + 1e-4).all()


def test_saq_chunk_crossing_several_stairs_goes_straight_to_its_stair_on_the_next_step():
    seq = Sequence(parse_staircase("32:16,64:8,96:4,inf:2"))
    first = seq.step(120)
    assert not first.moves  # fresh blocks need no data moved; all 8 sit on stair 0 while the step writes them
    assert [seq.stair(i) for i in range(8)] == [0] * 8
    plan = seq.step(1)
    # Ages 120 - 16 (i + 1) = 104, 88, 72, 56, 40, 24, 8 and the partial block; bounds 32, 64, 96.
    assert [seq.stair(i) for i in range(8)] == [3, 2, 2, 1, 1, 0, 0, 0]
    assert [(m.src, m.dst, len(m.dst_slots)) for m in plan.moves] == [(0, 1, 2), (0, 2, 2), (0, 3, 1)]


def test_reused_block_written_from_row_0_is_full_precision_again():
    seq = Sequence([(0, 16), (math.inf, 4)])
    seq.step(16)
    seq.step(1)  # block 0 is full and older than the (empty) window: quantized
    assert seq.stair(0) == 1
    seq.kv = seq.kv[:0]  # freed, and handed to a new request from its first row
    seq.step(10)
    assert seq.stair(0) == 0
    assert torch.equal(seq.gathered(), seq.truth())


def test_short_window_pool_steps_down_a_block_nobody_holds_first_without_its_stale_rows():
    held = {1, 2, 4}  # blocks a running request holds; 3 and 7 were left behind by finished / preempted ones
    layer = Layer(((0, 16), (math.inf, 4)), (2,), num_blocks=8, in_use=lambda block: block in held)
    old = torch.randn(16, 2, 64) * 100  # what a window slot held before: must not widen a later block's scales
    layer.step([([3], 0, old)])
    layer.step([([4], 0, old)])  # the two window slots are taken
    a = torch.randn(5, 2, 64)
    layer.step([([7], 0, a)])  # request A: 5 tokens in block 3's old slot, then preempted
    b = torch.randn(20, 2, 64)
    plan = layer.step([([1, 2], 0, b)])  # request B needs both window slots
    # Block 4 arrived before 7, but a running request holds it: 7 steps down first, with only its 5 real rows.
    assert [(m.src, m.dst, m.rows.tolist()) for m in plan.moves] == [(0, 1, [5, 16])]
    got = layer.gather([7, 1, 2])
    assert torch.allclose(got[0, :, :5], ref_minmax(a.transpose(0, 1), 4, dim=1), atol=1e-5)
    assert torch.equal(got[0, :, 32:36], b[16:].transpose(0, 1))  # B's partial block: exact
    assert [layer.staircase.stair[i] for i in (1, 2, 4, 7)] == [0, 0, 1, 1]


# ---- the scheduler sees the pools ----------------------------------------------------------------------------
BS = 4


def make_request(rid: str, prompt_len: int, max_tokens: int) -> Request:
    return Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                   frozenset({0}))


def saq_spec(max_num_seqs: int, budget_bytes: float) -> KVCacheSpec:
    shape = KVShape(num_kv_heads=1, block_size=BS, head_dim=32, dtype=torch.float32)
    return kv_cache_spec("saq", shape, 1, 0, parse_staircase("8:16,16:8,inf:2"), max_num_seqs=max_num_seqs,
                         max_num_batched_tokens=32, budget_bytes=budget_bytes)


def test_pools_sized_below_max_num_seqs_cap_the_running_sequences():
    full = saq_spec(max_num_seqs=8, budget_bytes=2 ** 30)
    assert full.max_seqs == 8
    short = saq_spec(max_num_seqs=8, budget_bytes=full.pool_bytes * 1.2)  # half of it: the pools shrink
    assert 1 <= short.max_seqs < 8
    kv = KVCacheManager(200, BS, enable_prefix_caching=False, spec=short)
    assert kv.max_running_seqs == short.max_seqs
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=32), kv, max_model_len=1000)
    for i in range(8):
        sched.add_request(make_request(str(i), 6, 3))
    out = sched.schedule()
    assert len(out.scheduled) == len(sched.running) == short.max_seqs
    assert KVCacheManager(200, BS, False).max_running_seqs is None  # a format without a staircase: no cap


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_running_sequences_blocks_sit_on_the_stair_their_age_says(prefix_caching):
    """Random prompts, chunked prefill, decodes and finishes with the pools at their sized capacity: after each
    step every block of a scheduled request is on the stair its age at the step's start gives (no block a running
    request holds steps down early), and the moves reach the runner's view intact. With prefix caching the
    prompts share prefixes: a shared block sits at the deepest stair a sharer's age gives, or on stair 0 while a
    sharer writes it."""
    rng = random.Random(0)
    spec = saq_spec(max_num_seqs=4, budget_bytes=2 ** 30)
    kv = KVCacheManager(400, BS, enable_prefix_caching=prefix_caching, spec=spec)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32), kv, max_model_len=1000)
    view = KVStairView(400, floor=len(spec.stairs) - 1)
    staircase = kv.staircase
    for i in range(12):
        sched.add_request(make_request(str(i), rng.randint(1, 40), rng.randint(1, 40)))
    steps = 0
    while sched.has_unfinished():
        out = sched.schedule()
        view.replay(out.kv_moves.get(0, []))
        assert view.stair == staircase.stair and view.slot == staircase.slot
        written = {kv.block_ids(s.request_id)[i] for s in out.scheduled
                   for i in range(s.start_pos // BS, (s.start_pos + s.num_tokens - 1) // BS + 1)}
        assert all(staircase.stair[b] == 0 for b in written)  # written this step: full precision
        for item in out.scheduled:
            table = kv.block_ids(item.request_id)
            for i in range(item.start_pos // BS):
                own = staircase.stair_for_age(item.start_pos - (i + 1) * BS)
                if table[i] in written:
                    continue
                if prefix_caching:
                    assert staircase.stair[table[i]] >= own
                else:
                    assert staircase.stair[table[i]] == own
        sched.update_from_output(out.scheduled, [7 if s.samples else None for s in out.scheduled])
        steps += 1
        assert steps < 500
    assert sched.num_preemptions == 0
    assert not prefix_caching or kv.prefix_hits > 0


def test_allocation_fails_unchanged_when_the_window_pool_cannot_take_the_step():
    shape = KVShape(num_kv_heads=1, block_size=BS, head_dim=32, dtype=torch.float32)
    spec = KVCacheSpec("int4", shape, 1, ((0, 16), (math.inf, 4)), (3,), max_seqs=1)
    kv = KVCacheManager(16, BS, enable_prefix_caching=False, spec=spec)
    a, b = make_request("a", 8, 1), make_request("b", 8, 1)
    assert kv.allocate_slots(a, 8)  # two blocks on stair 0, written this step: they cannot step down early
    free_before = kv.num_free_blocks
    assert not kv.allocate_slots(b, 8)  # needs two of the three slots; one is left
    assert kv.num_free_blocks == free_before and kv.block_ids("b") == []
    assert len(kv.take_stair_moves()) == 2  # a's two blocks; b planned nothing
    assert kv.allocate_slots(b, 8)  # next step: a's blocks may step down early to make room
