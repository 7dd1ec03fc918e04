"""Scheduler driven by fake requests and synthetic model outputs: schedule -> fabricate tokens -> update.

The fake model's next token depends only on the request's own token history, so outputs must not depend on
batching, chunking, prefix hits or preemption. A shadow of every KV slot checks that each chunk attends only to
K/V computed from its own token prefix.
"""
from __future__ import annotations

import hashlib
import pickle
import random
import weakref
from typing import NamedTuple

import pytest

from afdserve.engine.config import SchedulerConfig
from afdserve.engine.kv_cache_manager import KVCacheManager
from afdserve.engine.request import Request, RequestStatus
from afdserve.engine.request_state import RequestStates
from afdserve.engine.sampling_params import SamplingParams
from afdserve.engine.scheduler import Scheduler, SchedulerOutput

BS = 4
VOCAB = 50
EOS = 0


def fake_token(token_ids: list[int]) -> int:
    """Deterministic in the history only; never EOS (tests that want EOS say so)."""
    digest = hashlib.blake2b(repr(token_ids).encode(), digest_size=4).digest()
    return 1 + int.from_bytes(digest, "little") % (VOCAB - 1)


def make_scheduler(num_blocks=64, budget=32, max_seqs=8, caching=True, max_model_len=1000) -> Scheduler:
    kv = KVCacheManager(num_blocks, BS, caching)
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget), kv, max_model_len)


def make_request(rid: str, prompt: list[int], max_tokens=5, **params) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, **params), frozenset({EOS}))


def prompt_of(seed: int, length: int) -> list[int]:
    return [1 + (seed * 7919 + i * 31) % (VOCAB - 1) for i in range(length)]


class Shadow:
    """What an executor sees. The step messages are applied as an executor applies them (RequestStates), and the
    tokens and blocks they rebuild must equal the scheduler's own Request and KV manager. Then slot -> the token
    prefix its K/V came from: per step all chunks write, then every chunk reads its context."""

    def __init__(self):
        self.slots = {}
        self.states = RequestStates()

    def step(self, sched: Scheduler, out: SchedulerOutput) -> None:
        self.states.update(out)
        tokens = {}
        for s in out.scheduled:
            state = self.states[s.request_id]
            tokens[s.request_id] = state.token_ids(0, state.num_tokens)
            assert tokens[s.request_id] == sched.requests[s.request_id].all_token_ids
            assert state.block_ids == sched.kv.block_ids(s.request_id)
        written = set()
        for s in out.scheduled:
            blocks = self.states[s.request_id].block_ids
            for p in range(s.start_pos, s.start_pos + s.num_tokens):
                slot = (blocks[p // BS], p % BS)
                assert slot not in written, "two chunks of one step write the same slot"
                written.add(slot)
                self.slots[slot] = tuple(tokens[s.request_id][:p + 1])
        for s in out.scheduled:
            blocks = self.states[s.request_id].block_ids
            for p in range(s.start_pos + s.num_tokens):
                held = self.slots.get((blocks[p // BS], p % BS))
                assert held == tuple(tokens[s.request_id][:p + 1]), f"{s.request_id} reads bad KV at {p}"


SHADOWS: weakref.WeakKeyDictionary[Scheduler, Shadow] = weakref.WeakKeyDictionary()  # one per scheduler


class Step(NamedTuple):
    out: SchedulerOutput
    samples: list[bool]  # per chunk, taken before update_from_output grew the requests


def drive_step(sched: Scheduler, token_of=None, on_step=None) -> Step:
    """One step: schedule, check, fabricate a token for each chunk that samples, update."""
    shadow = SHADOWS.setdefault(sched, Shadow())
    running_before = list(sched.running)
    out = sched.schedule()
    check_step(sched, out, running_before)
    shadow.step(sched, out)
    samples = [s.samples for s in out.scheduled]
    sampled = [(token_of or fake_token)(sched.requests[s.request_id].all_token_ids) if smp else None
               for s, smp in zip(out.scheduled, samples)]
    if on_step is not None:
        on_step(sched, out, running_before)
    sched.update_from_output(out.scheduled, sampled)
    return Step(out, samples)


def run(sched: Scheduler, requests: list[Request], on_step=None, max_steps=10_000) -> list[SchedulerOutput]:
    """Drives the scheduler to completion with the fake model."""
    for r in requests:
        sched.add_request(r)
    outs = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return outs
        outs.append(drive_step(sched, on_step=on_step).out)
    pytest.fail("the scheduler did not finish")


def check_step(sched: Scheduler, out: SchedulerOutput, running_before: list[Request]) -> None:
    cfg = sched.config
    assert not out.is_empty, "a step with unfinished requests must schedule something"
    assert 0 < out.num_tokens <= cfg.max_num_batched_tokens
    assert len(sched.running) <= cfg.max_num_seqs
    ids = [s.request_id for s in out.scheduled]
    assert len(ids) == len(set(ids))
    requests = [sched.requests[s.request_id] for s in out.scheduled]
    for s, request in zip(out.scheduled, requests):
        assert s.num_tokens >= 1
        assert request.num_computed_tokens == s.start_pos + s.num_tokens <= request.num_tokens
        assert s.samples == (s.start_pos + s.num_tokens == request.num_tokens)
        assert len(sched.kv.block_ids(s.request_id)) * BS >= s.start_pos + s.num_tokens
    # Running requests come first, in running order; then newly admitted ones.
    old = [r for r in requests if r in running_before]
    assert requests[:len(old)] == old
    assert old == [r for r in running_before if r in old]


def check_no_leak(sched: Scheduler) -> None:
    kv = sched.kv
    assert kv.num_free_blocks == kv.pool.num_blocks
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)
    assert not kv.req_blocks and not kv._req_hashes
    assert not sched.running and not sched.waiting and not sched.requests


def reference_outputs(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(fake_token(tokens))
    return tokens[len(prompt):]


# ---- basic flow ---------------------------------------------------------------------------------------------

def test_single_request_prefill_then_decode():
    sched = make_scheduler()
    r = make_request("a", prompt_of(1, 10), max_tokens=4)
    outs = run(sched, [r])
    assert [(o.scheduled[0].start_pos, o.scheduled[0].num_tokens) for o in outs] == [(0, 10), (10, 1), (11, 1),
                                                                                      (12, 1)]
    assert r.output_token_ids == reference_outputs(r.prompt_token_ids, 4)
    assert r.status is RequestStatus.FINISHED_LENGTH
    check_no_leak(sched)


def test_chunked_prefill_samples_only_on_the_last_chunk():
    sched = make_scheduler(budget=16)
    r = make_request("a", prompt_of(2, 53), max_tokens=3)
    sched.add_request(r)
    steps = [drive_step(sched) for _ in range(6)]
    assert not sched.has_unfinished()
    chunks = [(st.out.scheduled[0].start_pos, st.out.scheduled[0].num_tokens, st.samples[0]) for st in steps]
    assert chunks == [(0, 16, False), (16, 16, False), (32, 16, False), (48, 5, True), (53, 1, True),
                      (54, 1, True)]
    assert r.output_token_ids == reference_outputs(r.prompt_token_ids, 3)
    check_no_leak(sched)


def test_decodes_first_and_token_budget():
    sched = make_scheduler(budget=10)
    a, b = make_request("a", prompt_of(3, 4), max_tokens=20), make_request("b", prompt_of(4, 5), max_tokens=20)
    for r in (a, b):
        sched.add_request(r)
    out = drive_step(sched).out
    assert [(s.request_id, s.num_tokens) for s in out.scheduled] == [("a", 4), ("b", 5)]
    c = make_request("c", prompt_of(5, 30), max_tokens=2)
    sched.add_request(c)
    out, samples = drive_step(sched)
    assert [(s.request_id, s.num_tokens) for s in out.scheduled] == [("a", 1), ("b", 1), ("c", 8)]
    assert out.num_tokens == 10
    assert samples == [True, True, False]


def test_waiting_requests_admitted_in_arrival_order_within_budget():
    sched = make_scheduler(budget=12)
    reqs = [make_request(str(i), prompt_of(i, 5), max_tokens=1) for i in range(4)]
    for r in reqs:
        sched.add_request(r)
    out = sched.schedule()
    # 5 + 5 + 2 (chunk) tokens; the fourth waits.
    assert [(s.request_id, s.num_tokens) for s in out.scheduled] == [("0", 5), ("1", 5), ("2", 2)]
    assert list(sched.waiting) == [reqs[3]]


def test_max_num_seqs_respected():
    sched = make_scheduler(max_seqs=2, budget=64)
    reqs = [make_request(str(i), prompt_of(i, 6), max_tokens=3) for i in range(5)]

    def at_most_two(sched, out, running_before):
        assert len(out.scheduled) <= 2 and len(sched.running) <= 2

    run(sched, reqs, on_step=at_most_two)
    for r in reqs:
        assert r.output_token_ids == reference_outputs(r.prompt_token_ids, 3)
    check_no_leak(sched)


# ---- stopping -----------------------------------------------------------------------------------------------

def step_with(sched: Scheduler, token: int) -> Step:
    return drive_step(sched, token_of=lambda _: token)


def test_stop_on_eos_and_ignore_eos():
    sched = make_scheduler()
    r = make_request("a", [5, 6], max_tokens=10)
    sched.add_request(r)
    step_with(sched, 7)
    step_with(sched, EOS)
    assert r.status is RequestStatus.FINISHED_STOPPED and r.output_token_ids == [7, EOS]
    assert r.stop_reason is None
    out = sched.schedule()
    assert out.finished_request_ids == {"a"} and out.is_empty
    check_no_leak(sched)

    r = make_request("b", [5, 6], max_tokens=3, ignore_eos=True)
    sched.add_request(r)
    for _ in range(3):
        step_with(sched, EOS)
    assert r.status is RequestStatus.FINISHED_LENGTH and r.output_token_ids == [EOS] * 3


def test_stop_token_ids_and_min_tokens():
    sched = make_scheduler()
    r = make_request("a", [5, 6], max_tokens=10, stop_token_ids=[9], min_tokens=3)
    sched.add_request(r)
    for tok in (9, EOS):
        step_with(sched, tok)
        assert r.status is RequestStatus.RUNNING, "no stop before min_tokens outputs"
    step_with(sched, 9)  # the third output may stop
    assert r.status is RequestStatus.FINISHED_STOPPED and r.stop_reason == 9 and r.num_output_tokens == 3
    r = make_request("b", [5], max_tokens=10, stop_token_ids=[9], min_tokens=2)
    sched.add_request(r)
    step_with(sched, 4)
    step_with(sched, EOS)  # the second output reaches min_tokens: EOS counts
    assert r.status is RequestStatus.FINISHED_STOPPED and r.output_token_ids == [4, EOS]
    check_no_leak(sched)


def test_length_caps_max_tokens_and_model_len():
    sched = make_scheduler(max_model_len=8)
    r = make_request("a", [1, 2, 3, 4, 5], max_tokens=100)
    run(sched, [r])
    assert r.status is RequestStatus.FINISHED_LENGTH and r.num_tokens == 8 and r.num_output_tokens == 3
    check_no_leak(sched)


def test_abort_running_waiting_and_unknown():
    sched = make_scheduler(budget=8, max_seqs=1)
    a, b = make_request("a", prompt_of(1, 12), max_tokens=5), make_request("b", prompt_of(2, 3), max_tokens=5)
    sched.add_request(a)
    sched.add_request(b)
    step_with(sched, 3)  # a mid-prefill, b waiting
    assert a.status is RequestStatus.RUNNING and b.status is RequestStatus.WAITING
    assert sched.abort(["a", "b", "nope"]) == [a, b]
    assert a.status is RequestStatus.FINISHED_ABORTED and b.status is RequestStatus.FINISHED_ABORTED
    assert sched.abort(["a"]) == []
    assert sched.schedule().finished_request_ids == {"a", "b"}
    check_no_leak(sched)


# ---- prefix caching -----------------------------------------------------------------------------------------

def test_prefix_hit_same_step_and_later():
    sched = make_scheduler(budget=64)
    prompt = prompt_of(7, 18)  # 4 full blocks + 2 tokens
    a, b = make_request("a", prompt, max_tokens=2), make_request("b", prompt, max_tokens=2)
    sched.add_request(a)
    sched.add_request(b)
    out = drive_step(sched).out
    assert [(s.start_pos, s.num_tokens) for s in out.scheduled] == [(0, 18), (16, 2)]
    assert (a.num_cached_tokens, b.num_cached_tokens) == (0, 16)
    assert sched.kv.prefix_hits == 16 and sched.kv.prefix_queries == 36
    run(sched, [])
    assert a.output_token_ids == b.output_token_ids == reference_outputs(prompt, 2)
    check_no_leak(sched)
    c = make_request("c", prompt + [1, 2], max_tokens=2)
    outs = run(sched, [c])
    assert outs[0].scheduled[0].start_pos == 16 and c.num_cached_tokens == 16
    assert sched.stats().prefix_hits == 32
    check_no_leak(sched)


def test_prefix_caching_saves_tokens_and_keeps_outputs():
    prompts = [prompt_of(1, 30)] * 3 + [prompt_of(1, 30)[:20] + prompt_of(9, 15)]
    results = {}
    for caching in (False, True):
        sched = make_scheduler(budget=24, caching=caching)
        reqs = [make_request(str(i), p, max_tokens=6) for i, p in enumerate(prompts)]
        outs = run(sched, reqs)
        results[caching] = ([r.output_token_ids for r in reqs], sum(o.num_tokens for o in outs))
        check_no_leak(sched)
    assert results[True][0] == results[False][0] == [reference_outputs(p, 6) for p in prompts]
    assert results[True][1] < results[False][1]


# ---- preemption ---------------------------------------------------------------------------------------------

def test_preempted_victim_is_the_newest_and_blocks_admissions():
    # 7 blocks of 4: three 8-token prompts take 2 blocks each; each first decode (position 8) needs a new one.
    sched = make_scheduler(num_blocks=7, budget=64, caching=False)
    reqs = [make_request(str(i), prompt_of(i, 8), max_tokens=4) for i in range(3)]
    for r in reqs:
        sched.add_request(r)
    assert len(drive_step(sched).out.scheduled) == 3 and sched.kv.num_free_blocks == 1
    late = make_request("late", prompt_of(9, 3), max_tokens=1)
    sched.add_request(late)
    out = drive_step(sched).out  # 0 takes the free block; 1 needs one, so 2 (the newest) is preempted
    assert [s.request_id for s in out.scheduled] == ["0", "1"]
    assert list(sched.waiting) == [reqs[2], late], "the victim goes to the front"
    assert sched.kv.num_free_blocks == 1, "late would fit, but nothing is admitted in a step that preempted"
    assert reqs[2].num_computed_tokens == 0 and reqs[2].status is RequestStatus.PREEMPTED
    assert reqs[2].num_preemptions == 1 and sched.num_preemptions == 1 and sched.kv.block_ids("2") == []
    run(sched, [])
    assert all(r.output_token_ids == reference_outputs(r.prompt_token_ids, 4) for r in reqs)
    check_no_leak(sched)


def test_no_admission_in_a_step_that_preempted():
    sched = make_scheduler(num_blocks=8, budget=10, caching=False)
    a, b, c = (make_request("a", prompt_of(0, 8), max_tokens=9), make_request("b", prompt_of(1, 2), max_tokens=9),
               make_request("c", prompt_of(2, 12), max_tokens=9))
    for r in (a, b, c):
        sched.add_request(r)
    for _ in range(3):
        drive_step(sched)
    assert (len(sched.kv.req_blocks["a"]), len(sched.kv.req_blocks["b"]), len(sched.kv.req_blocks["c"])) == (3, 1, 3)
    # a fits; b takes the last free block; c needs one more, so it preempts itself and frees 3 blocks.
    out = drive_step(sched).out
    assert [s.request_id for s in out.scheduled] == ["a", "b"]
    assert list(sched.waiting) == [c] and c.num_preemptions == 1
    assert sched.kv.num_free_blocks == 3, "c's next chunk (8 tokens, 2 blocks) would fit, yet it must wait a step"
    out = drive_step(sched).out
    assert [(s.request_id, s.start_pos, s.num_tokens) for s in out.scheduled] == [("a", 11, 1),
                                                                                          ("b", 5, 1), ("c", 0, 8)]
    run(sched, [])
    assert all(r.output_token_ids == reference_outputs(r.prompt_token_ids, 9) for r in (a, b, c))
    check_no_leak(sched)


def test_newest_request_preempts_itself():
    # 4 blocks: "0" (6 tokens) still has room in its second block; "1" (8 tokens) needs a third block.
    sched = make_scheduler(num_blocks=4, budget=64, caching=False)
    a, b = make_request("0", prompt_of(0, 6), max_tokens=2), make_request("1", prompt_of(1, 8), max_tokens=2)
    sched.add_request(a)
    sched.add_request(b)
    drive_step(sched)
    assert sched.kv.num_free_blocks == 0
    out = drive_step(sched).out
    assert [s.request_id for s in out.scheduled] == ["0"]
    assert sched.running == [] and list(sched.waiting) == [b], "0 finished, 1 waits at the front"
    assert b.status is RequestStatus.PREEMPTED and b.num_output_tokens == 1
    run(sched, [])
    assert b.output_token_ids == reference_outputs(b.prompt_token_ids, 2)
    check_no_leak(sched)


@pytest.mark.parametrize("caching", [False, True])
def test_tiny_pool_preempts_and_matches_large_pool(caching):
    prompts = [prompt_of(i, 5 + 3 * i) for i in range(5)] + [prompt_of(0, 5) + [3, 3]]
    max_tokens = [12, 9, 14, 7, 10, 8]

    def requests():
        return [make_request(str(i), p, max_tokens=m) for i, (p, m) in enumerate(zip(prompts, max_tokens))]

    victims = []

    def record_preemptions(sched, out, running_before):
        gone = [r for r in running_before if r not in sched.running]
        if gone:
            assert gone == running_before[len(running_before) - len(gone):], "victims must be the newest"
            assert all(sched.requests[s.request_id] in running_before for s in out.scheduled), \
                "no admissions when preempting"
            assert list(sched.waiting)[:len(gone)] == gone
            assert all(r.num_computed_tokens == 0 for r in gone)
            victims.extend(gone)

    big = make_scheduler(num_blocks=200, budget=16, caching=caching)
    big_reqs = requests()
    run(big, big_reqs)
    assert big.num_preemptions == 0
    small = make_scheduler(num_blocks=9, budget=16, caching=caching)
    small_reqs = requests()
    run(small, small_reqs, on_step=record_preemptions)
    assert small.num_preemptions > 0 and victims
    for r_small, r_big, m in zip(small_reqs, big_reqs, max_tokens):
        assert r_small.num_output_tokens == m and r_small.status is RequestStatus.FINISHED_LENGTH
        assert r_small.output_token_ids == r_big.output_token_ids == reference_outputs(r_big.prompt_token_ids, m)
    check_no_leak(small)
    check_no_leak(big)


def test_abort_after_preemption_frees_everything():
    sched = make_scheduler(num_blocks=8, budget=16, caching=True)
    reqs = [make_request(str(i), prompt_of(i % 2, 9), max_tokens=30) for i in range(4)]
    for r in reqs:
        sched.add_request(r)
    for _ in range(40):
        step_with(sched, 5)
        if sched.num_preemptions and sched.waiting:
            break
    assert sched.num_preemptions > 0
    assert any(r.status is RequestStatus.PREEMPTED for r in sched.waiting)
    sched.abort([r.request_id for r in reqs])
    check_no_leak(sched)


def test_stop_mid_run_from_front_end_frees_blocks():
    sched = make_scheduler()
    a, b = make_request("a", prompt_of(1, 9), max_tokens=10), make_request("b", prompt_of(1, 9), max_tokens=10)
    sched.add_request(a)
    sched.add_request(b)
    step_with(sched, 4)
    sched.finish(a, RequestStatus.FINISHED_STOPPED)  # e.g. a stop string found by the detokenizer
    sched.finish(a, RequestStatus.FINISHED_STOPPED)  # finishing twice is harmless
    assert a.status is RequestStatus.FINISHED_STOPPED
    assert all(blk.ref_cnt == 1 for blk in sched.kv.req_blocks["b"])
    run(sched, [])
    assert b.num_output_tokens == 10
    check_no_leak(sched)


# ---- randomized -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_random_workload(seed):
    """Random prompts sharing prefixes, a small pool, random budgets, aborts and stop tokens: every finished
    request matches the reference model, every step reads only correct K/V, and nothing leaks."""
    rng = random.Random(seed)
    num_blocks = rng.randrange(6, 12)
    sched = make_scheduler(num_blocks=num_blocks, budget=rng.randrange(4, 24), max_seqs=rng.randrange(2, 6),
                           caching=rng.random() < 0.7)
    stems = [prompt_of(rng.randrange(100), rng.randrange(1, 12)) for _ in range(3)]
    reqs = []
    aborted = set()
    for step in range(400):
        if rng.random() < 0.4 and len(reqs) < 30:
            prompt = rng.choice(stems) + prompt_of(rng.randrange(100), rng.randrange(0, 6))
            max_tokens = rng.randrange(1, min(20, num_blocks * BS - len(prompt)))
            stop = [rng.randrange(1, VOCAB)] if rng.random() < 0.3 else []
            r = make_request(f"r{step}", prompt, max_tokens=max_tokens, stop_token_ids=stop,
                             prompt_logprobs=0 if rng.random() < 0.1 else None)
            reqs.append(r)
            sched.add_request(r)
        if rng.random() < 0.03 and sched.requests:
            rid = rng.choice(sorted(sched.requests))
            aborted.add(rid)
            sched.abort([rid])
        if sched.has_unfinished():
            drive_step(sched)
    run(sched, [])
    assert sched.num_preemptions > 0, "the workload should exercise preemption"
    for r in reqs:
        if r.request_id in aborted:
            assert r.status is RequestStatus.FINISHED_ABORTED
            continue
        expected = reference_outputs(r.prompt_token_ids, r.max_tokens)
        stops = [i for i, t in enumerate(expected) if t in r.sampling_params.stop_token_ids]
        if stops:
            expected = expected[:stops[0] + 1]
        assert r.output_token_ids == expected
        # As in vLLM v1, reaching max_tokens reads as "length" even when the last token is a stop token.
        stopped = stops and len(expected) < r.max_tokens
        assert r.status is (RequestStatus.FINISHED_STOPPED if stopped else RequestStatus.FINISHED_LENGTH)
    check_no_leak(sched)


# ---- the step message -----------------------------------------------------------------------------------------
def _decode_step_bytes(prompt_len: int) -> list[int]:
    """Pickled sizes of the pure decode steps of 4 requests with prompts of `prompt_len` tokens."""
    sched = make_scheduler(num_blocks=4 * (prompt_len // BS + 4), budget=4 * prompt_len, max_seqs=4,
                           max_model_len=4096)
    for i in range(4):
        sched.add_request(make_request(f"r{i}", prompt_of(i, prompt_len), max_tokens=6))
    sizes = []
    while sched.has_unfinished():
        step = drive_step(sched)
        if all(s.num_tokens == 1 and s.new is None for s in step.out.scheduled):
            sizes.append(len(pickle.dumps(step.out)))
    return sizes


def test_a_decode_step_message_does_not_grow_with_the_context():
    short, long = _decode_step_bytes(16), _decode_step_bytes(1024)
    assert short and long
    assert max(long) <= 1.1 * min(short)
    # A new request carries its prompt once: the first step of a long prompt is large.
    sched = make_scheduler(budget=2048, num_blocks=600, max_model_len=4096)
    sched.add_request(make_request("r", prompt_of(0, 1024)))
    assert len(pickle.dumps(sched.schedule())) > 1024
