"""TPOT SLA control (--tpot-slo-ms): the step-time fit against numpy's least squares, the limits against the model's
arithmetic, the scheduler under those limits (nothing lost, no leak), and an engine whose steps slow down with the
batch: with the SLO its batch stays where the fitted step time meets the target; without it the batch grows."""
from __future__ import annotations

import math
import random
import time

import numpy as np
import pytest

from afdserve.engine.config import EngineConfig, ParallelConfig, SchedulerConfig
from afdserve.engine.engine_core import EngineCore
from afdserve.engine.model_runner import ModelRunnerOutput
from afdserve.engine.request import Request
from afdserve.engine.sampling_params import SamplingParams
from afdserve.engine.kv_cache_manager import KVCacheManager
from afdserve.engine.scheduler import Scheduler
from afdserve.engine.sla_control import HEADROOM, MIN_PREFILL_CHUNK, MIN_STEPS, StepTimeModel, TPOTController
from test_scheduler import BS, check_no_leak, drive_step, make_request, prompt_of


def lstsq(samples, columns):
    x = np.array([[1.0, d, p] for d, p, _ in samples])[:, columns]
    y = np.array([t for _, _, t in samples])
    return np.linalg.lstsq(x, y, rcond=None)[0]


def test_fit_matches_least_squares_on_mixed_steps():
    rng = random.Random(0)
    model = StepTimeModel()
    samples = []
    for d in rng.sample(range(40), 40):  # one step per shape: the shapes' points are the steps themselves
        p = rng.choice([0, 0, 16, 64, 200])
        t = 0.004 + 0.0015 * d + 0.00007 * p + rng.gauss(0, 0.0003)
        samples.append((d, p, t))
        model.observe(d, p, t)
    assert model.coef == pytest.approx(tuple(lstsq(samples, [0, 1, 2])), rel=1e-6, abs=1e-12)
    assert model.coef == pytest.approx((0.004, 0.0015, 0.00007), rel=0.15)


def test_a_batch_held_at_the_cap_keeps_its_fit():
    """Long after the slow start, with every step at nearly one batch size, the shapes seen on the way up still
    anchor the line."""
    rng = random.Random(1)
    model = StepTimeModel()
    step = lambda d, p: 0.020 + 0.004 * d + 0.0001 * p + rng.gauss(0, 0.002)
    for d in range(1, 13):  # the slow start: one more sequence a step, each admitted with its prompt
        model.observe(d - 1, 128, step(d - 1, 128))
        model.observe(d, 0, step(d, 0))
    for _ in range(2000):  # then the batch sits at 11-12 for a long time
        d = rng.choice([11, 12])
        model.observe(d, 0, step(d, 0))
    assert model.coef == pytest.approx((0.020, 0.004, 0.0001), rel=0.25)


def test_decode_only_steps_fit_without_a_prefill_term():
    model = StepTimeModel()
    samples = [(d, 0, 0.01 + 0.002 * d) for d in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10)]
    for s in samples:
        model.observe(*s)
    a, b = lstsq(samples, [0, 1])
    assert model.coef == pytest.approx((a, b, 0.0), abs=1e-12)
    assert model.predict(20, 0) == pytest.approx(0.05)


def test_a_negative_slope_is_fixed_at_zero_and_the_rest_refitted():
    # time falls with prefill tokens in this (noisy, small) sample: the fit must not promise endless prefill room
    samples = [(d, p, 0.02 + 0.001 * d - 0.00001 * p) for d, p in
               [(1, 0), (2, 100), (3, 0), (4, 300), (5, 0), (6, 50), (7, 0), (8, 400), (9, 10)]]
    model = StepTimeModel()
    for s in samples:
        model.observe(*s)
    a, b = lstsq(samples, [0, 1])
    assert model.coef == pytest.approx((a, b, 0.0), abs=1e-12)


def test_the_batch_grows_one_a_step_until_the_fit_is_trusted():
    ctl = TPOTController(0.1)
    for i in range(MIN_STEPS):
        assert ctl.limits(5).max_seqs == max(1, i) and ctl.limits(5).prefill_tokens is None
        ctl.observe(i + 1, 0, 0.002 * (i + 1))
    assert ctl.limits(5).max_seqs == math.floor(0.1 * HEADROOM / 0.002)


def fitted_controller(slo_s, a, b, c) -> TPOTController:
    ctl = TPOTController(slo_s)
    for d, p in [(1, 0), (2, 64), (4, 0), (8, 128), (16, 0), (3, 256), (5, 0), (10, 32), (12, 0)]:
        ctl.observe(d, p, a + b * d + c * p)
    assert ctl.model.coef == pytest.approx((a, b, c))
    return ctl


def test_limits_follow_the_fitted_model():
    ctl = fitted_controller(0.1, a=0.010, b=0.0048, c=0.00011)  # limits away from integers: rounding can't flip them
    target = 0.1 * HEADROOM
    limits = ctl.limits(num_decodes=10)
    # (target - a - c MIN_PREFILL_CHUNK) / b rows and (target - a - 10 b) / c tokens: the predicted steps at the
    # limits meet the target, one more row or token would not
    assert limits.max_seqs == math.floor((target - 0.010 - 0.00011 * MIN_PREFILL_CHUNK) / 0.0048)
    assert limits.prefill_tokens == math.floor((target - 0.010 - 0.0048 * 10) / 0.00011)
    full = ctl.model.predict  # a full batch with the smallest prefill chunk beside it
    assert full(limits.max_seqs, MIN_PREFILL_CHUNK) <= target < full(limits.max_seqs + 1, MIN_PREFILL_CHUNK)
    assert ctl.model.predict(10, limits.prefill_tokens) <= target < ctl.model.predict(10, limits.prefill_tokens + 1)
    # a batch over the cap still gets a small prefill chunk, and an empty one no prefill limit
    assert ctl.limits(num_decodes=limits.max_seqs + 1).prefill_tokens == MIN_PREFILL_CHUNK
    assert ctl.limits(num_decodes=0).prefill_tokens is None
    # an SLO below the fixed cost still lets one sequence run
    assert fitted_controller(0.005, a=0.010, b=0.005, c=0.0001).limits(0).max_seqs == 1


def test_scheduler_under_limits_caps_the_batch_and_loses_nothing():
    ctl = fitted_controller(0.1, a=0.010, b=0.005, c=0.0001)  # 14 sequences; prefill room 750 - 50 * decodes
    cap = ctl.limits(0).max_seqs
    sched = Scheduler(SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=512),
                      KVCacheManager(512, BS, True), max_model_len=1000, sla=ctl)
    requests = [make_request(f"r{i}", prompt_of(i, 40 + i % 30), max_tokens=12) for i in range(40)]
    for r in requests:
        sched.add_request(r)
    peak = 0
    for _ in range(2000):
        if not sched.has_unfinished():
            break
        decoding = sched._num_decoding()
        limit = ctl.limits(decoding).prefill_tokens
        out = drive_step(sched).out
        peak = max(peak, len(sched.running))
        assert len(sched.running) <= cap
        prefill = sum(s.num_tokens for s in out.scheduled if s.num_tokens > 1)
        if decoding:
            assert prefill <= limit
    assert peak == cap
    assert all(r.num_output_tokens == 12 for r in requests)
    check_no_leak(sched)
    assert ctl.held_steps > 0


def test_config_refuses_bad_slo_and_data_parallel_attention():
    with pytest.raises(ValueError, match="tpot_slo_ms"):
        SchedulerConfig(tpot_slo_ms=0)
    with pytest.raises(ValueError, match="tpot_slo_ms"):
        SchedulerConfig(tpot_slo_ms=float("nan"))
    with pytest.raises(ValueError, match="tpot_slo_ms caps one scheduler"):
        EngineConfig(scheduler=SchedulerConfig(tpot_slo_ms=50), parallel=ParallelConfig(afd="2A1F"))


class SlowsWithBatch:
    """An executor whose step takes 2 ms + 4 ms per decode row (a fake model: the token is always 1)."""

    def __init__(self):
        self.batch_sizes = []

    def execute(self, out):
        rows = sum(1 for s in out.scheduled if s.num_tokens == 1)
        self.batch_sizes.append(len(out.scheduled))
        time.sleep(0.002 + 0.004 * rows)
        return ModelRunnerOutput([1 if s.samples else None for s in out.scheduled], [None] * len(out.scheduled))

    def latest_stage_times(self):
        return None

    def expert_cache_totals(self):
        return None

    def shutdown(self):
        pass


def run_engine(slo_ms):
    config = EngineConfig(scheduler=SchedulerConfig(max_num_seqs=32, tpot_slo_ms=slo_ms))
    executor = SlowsWithBatch()
    core = EngineCore(config, executor, num_kv_blocks=1024, max_model_len=512)
    for i in range(32):
        core.add_request(Request(f"r{i}", [5] * 8, SamplingParams(max_tokens=24, ignore_eos=True), frozenset({0})))
    while core.has_unfinished():
        core.step()
    assert core.num_free_blocks == 1024
    return core, executor


def test_engine_batch_stays_under_the_slo_where_the_step_slows_with_it():
    core, executor = run_engine(slo_ms=None)
    assert max(executor.batch_sizes) == 32
    core, executor = run_engine(slo_ms=40)
    # below MIN_STEPS rows while the fit learns; then the fitted cost per row is >= 4 ms (sleep only oversleeps),
    # so at most (34 - 2) / 4 = 8 rows fit the target
    assert max(executor.batch_sizes) <= 8
    assert core.sla.stats().max_seqs <= 8 and core.sla.stats().held_steps > 0
