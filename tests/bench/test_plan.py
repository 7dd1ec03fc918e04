"""bench/plan.py, the AFD deployment planner (MegaScale-Infer, arXiv 2504.02263, on Step-3's cost inputs, arXiv
2507.19427): per-layer times against hand-derived values for a made-up model and card, the distinct-experts formula
against a Monte-Carlo draw, the pipeline latency against an independent simulation of the A/F ping-pong, the batch
search, the measured-mode fit on synthetic results, and the Step-3 2A2F headline."""
import random

import numpy as np
import pytest

from afdserve.bench.cost import CATALOG, AttentionLayers, CostModel, Hardware
from afdserve.bench.plan import (LayerTimes, Options, attention_time, comm_time, evaluate,
                                 expected_distinct_experts, ffn_time, fit_measured, format_plan, kv_efficiency,
                                 largest_feasible, pipeline_latency, plan, plan_measured, predict_fixed, step3_2a2f)

# Toy model: 2 layers of GQA (2 query heads, 1 KV head, head dim 4, 1-byte KV, 100 projection weights per layer);
# 2 of 8 experts active, 300 weights each, so activated FFN params = 2 layers x 2 x 300 = 1200.
TOY = CostModel("toy", hidden=10, layers=2, attention=(AttentionLayers(2, "gqa", 2, 1, 4, proj_params=100),),
                ffn_params=1200, experts_active=2, experts_total=8)
# Per token per layer at ctx = 1000: KV 2*1*4*1*1000 = 8000 B; attention 4*2*4*1000 = 32000 FLOPs; linear 2*100 =
# 200 FLOPs; projection weights 100 B; FFN 2*1200/2 = 1200 FLOPs; one expert 1200/2/2 = 300 B.
TOY_FP8 = Hardware("toy-fp8", 1.0, 1e12, 2e12, 1e11, 1e10)  # peak 2e12 (FP8), W 1e11, Net 1e10
TOY_BF16 = Hardware("toy-bf16", None, 1e11, None, 1e11, 1e10)  # no FP8: peak 1e11


def test_attention_time_by_hand():
    # b = 16 per instance, 2 per GPU. FP8 card: attention 2*32000/2e12 = 3.2e-8 < KV 2*8000/1e11 = 1.6e-7 (KV-bound);
    # linear 2*200/2e12 = 2e-10; weights 100/1e11 = 1e-9. Total 1.6e-7 + 2e-10 + 1e-9 = 1.612e-7.
    assert attention_time(TOY, TOY_FP8, 1000, 16) == pytest.approx(1.612e-7)
    # At half the bandwidth on KV: 3.2e-7 + 1.2e-9.
    assert attention_time(TOY, TOY_FP8, 1000, 16, kv_efficiency=0.5) == pytest.approx(3.212e-7)
    # BF16 card: attention 2*32000/1e11 = 6.4e-7 > KV 1.6e-7 (FLOP-bound); linear 400/1e11 = 4e-9; weights 1e-9.
    assert attention_time(TOY, TOY_BF16, 1000, 16) == pytest.approx(6.45e-7)


def test_ffn_time_by_hand():
    # 4 tokens touch 8 (1 - (6/8)^4) = 5.46875 experts: 5.46875 * 300 B / (8 GPUs * 1e11) = 2.05078125e-9 s, more
    # than the FLOPs 4 * 1200 / (8 * 2e12) = 3e-10: weight-bound. Two instances halve it.
    assert ffn_time(TOY, TOY_FP8, 4, 1) == pytest.approx(2.05078125e-9)
    assert ffn_time(TOY, TOY_FP8, 4, 2) == pytest.approx(1.025390625e-9)
    # 1e6 tokens: FLOPs 1e6 * 1200 / 1.6e13 = 7.5e-5 s against all 8 experts' 2400 B / 8e11 = 3e-9: compute-bound.
    assert ffn_time(TOY, TOY_FP8, 1e6, 1) == pytest.approx(7.5e-5)
    # A dense model (1 expert of 1) reads all its weights: 1200/2 = 600 B per layer / 8e11 for 1 token.
    dense = CostModel("dense", 10, 2, TOY.attention, 1200)
    assert ffn_time(dense, TOY_FP8, 1, 1) == pytest.approx(600 / 8e11)


def test_comm_time_by_hand():
    # The F->A direction: 2 bytes x H 10 x 4 tokens = 80 B over one FFN server's 1e10 B/s = 8e-9 s.
    assert comm_time(TOY, TOY_FP8, TOY_FP8, 4, 1, 1) == pytest.approx(8e-9)
    # 1A2F: the attention server exchanges with both FFN servers, 160 B over its own 1e10: 1.6e-8.
    assert comm_time(TOY, TOY_FP8, TOY_FP8, 4, 1, 2) == pytest.approx(1.6e-8)
    # 2A1F: the FFN server is the busier side (80 B), each attention server moves 40 B.
    assert comm_time(TOY, TOY_FP8, TOY_FP8, 4, 2, 1) == pytest.approx(8e-9)
    # DeepEP's 40 of 50 GB/s: 8e-9 / 0.8.
    assert comm_time(TOY, TOY_FP8, TOY_FP8, 4, 1, 1, realistic_net=True) == pytest.approx(1e-8)


def test_expected_distinct_experts_against_monte_carlo():
    rng = np.random.default_rng(0)
    trials, k, e = 4000, 4, 49
    for tokens in (1, 3, 10, 40):
        keys = rng.random((trials, tokens, e))
        picks = np.argpartition(keys, k, axis=-1)[..., :k]  # k distinct experts per token, uniformly
        touched = np.zeros((trials, e), dtype=bool)
        np.put_along_axis(touched, picks.reshape(trials, -1), True, axis=-1)
        counts = touched.sum(axis=-1)
        tolerance = 4 * counts.std() / np.sqrt(trials) + 1e-9
        assert expected_distinct_experts(k, e, tokens) == pytest.approx(counts.mean(), abs=tolerance)
    assert expected_distinct_experts(1, 1, 7) == 1.0


def simulate(t_a, t_f, t_c, m, layers, links_are_servers=True):
    """The ping-pong, event by event: every (layer, micro-batch) goes attention -> A->F link -> FFN -> F->A link.
    Attention and FFN (and the links, if servers) each serve one at a time, in layer-major order; a pure-delay link
    only adds t_c. Returns when the last micro-batch is back from the last layer."""
    free = {"attention": 0.0, "up": 0.0, "ffn": 0.0, "down": 0.0}
    back = [0.0] * m  # when micro-batch j is back at attention
    for _ in range(layers):
        for j in range(m):
            now = back[j]
            for server, duration in (("attention", t_a), ("up", t_c), ("ffn", t_f), ("down", t_c)):
                queued = server in ("attention", "ffn") or links_are_servers
                now = (max(now, free[server]) if queued else now) + duration
                if queued:
                    free[server] = now
            back[j] = now
    return max(back)


def test_pipeline_latency_by_hand():
    # t_A 3, t_F 2, t_C 0.5, m 3, L 4: R = 6 <= m T_f = 9, MSI's 6 + 3 (3*4 - 1) = 39, attention-bound.
    assert pipeline_latency(LayerTimes(3, 2, 0.5), 3, 4) == (pytest.approx(39), "attention")
    # m = 1: every layer is a full round trip, 4 * 6 = 24.
    assert pipeline_latency(LayerTimes(3, 2, 0.5), 1, 4) == (pytest.approx(24), "round-trip")
    # The link slowest: t_C 4 > t_A, t_F, m 4: R = 13 <= 16, total 13 + 4 (16 - 1) = 73.
    assert pipeline_latency(LayerTimes(3, 2, 4), 4, 4) == (pytest.approx(73), "comm")


def test_pipeline_latency_against_simulation():
    rng = random.Random(0)
    for _ in range(600):
        t_a, t_f, t_c = rng.uniform(0.1, 2), rng.uniform(0.1, 2), rng.choice([0.0, rng.uniform(0, 2.5)])
        m, layers = rng.randint(1, 4), rng.randint(1, 8)
        total, _ = pipeline_latency(LayerTimes(t_a, t_f, t_c), m, layers)
        assert total == pytest.approx(simulate(t_a, t_f, t_c, m, layers), rel=1e-12)
        stage = max(t_a, t_f)
        if t_c <= stage:  # a link never queues: a pure delay gives the same
            assert total == pytest.approx(simulate(t_a, t_f, t_c, m, layers, links_are_servers=False), rel=1e-12)
        if t_c <= stage and m >= 2 * (1 + t_c / stage):  # MSI's regime and formula, written out
            msi = (t_a + t_f + 2 * t_c) + stage * (m * layers - 1)
            assert simulate(t_a, t_f, t_c, m, layers, links_are_servers=False) == pytest.approx(msi, rel=1e-12)


def test_largest_feasible():
    assert largest_feasible(lambda n: n <= 37, 100) == 37
    assert largest_feasible(lambda n: n <= 37, 20) == 20
    assert largest_feasible(lambda n: n <= 1, 100) == 1
    assert largest_feasible(lambda n: False, 100) == 0


def test_predict_fixed_returns_the_largest_feasible_batch():
    model, hw = CATALOG["Step-3"], Hardware("H800", 2.0, 9.89e14, 1.98e15, 3.35e12, 4e11)
    for opts, tpot in ((Options(), 0.05), (Options(), 0.02), (Options(kv_efficiency=0.5), 0.05),
                       (Options(memory_bytes=40e9), 0.05)):
        for x, y, m in ((2, 2, 3), (1, 1, 1), (3, 1, 4)):
            p = predict_fixed(model, hw, 4096, tpot, x, y, m, opts)
            capacity = (opts.memory_bytes or 80e9) - 61 * 169_345_024  # less the attention weights, 1 B each
            seq_kv = 61 * 2 * 256 * 4096  # FP8 KV of one 4K sequence
            assert p.batch % (m * x) == 0 and p.tpot_s <= tpot
            assert p.batch / (8 * x) * seq_kv <= capacity
            bigger = evaluate(model, hw, 4096, x, y, m, p.batch + m * x, opts)
            assert bigger.tpot_s > tpot or (p.batch + m * x) / (8 * x) * seq_kv > capacity


def test_plan_ranks_by_throughput_per_gpu_and_prices():
    plans = plan(TOY, TOY_FP8, 1000, 1e-5, Options(memory_bytes=1e6), x_max=2, y_max=2, m_max=2, top=5)
    assert len(plans) == 5
    assert [p.tok_s_per_gpu for p in plans] == sorted((p.tok_s_per_gpu for p in plans), reverse=True)
    p = plans[0]
    assert p.tokens_per_usd == pytest.approx(p.tok_s * 3600 / (8 * (p.x + p.y) * 1.0))
    assert p.kv_gb_per_gpu * 1e9 <= 1e6 - 2 * 100  # memory less 2 layers of 100 B of projection weights
    assert "tok/s/GPU" in format_plan(plans)


def fake_run(k, n, m, layers=30, transfer=True):
    """A `bench throughput --afd 1A1F --json` result from known per-micro-batch times and per-step overhead."""
    b = n / m
    t_a, t_f, t_c = k["k1"] * b + k["k2"], k["k3"] * b + k["k4"], k["kc"] * b
    tpot = simulate(t_a, t_f, t_c, m, layers) + k["o1"] * n + k["o0"]
    times = {"attention_ms_per_layer": 1e3 * m * t_a, "ffn_ms_per_layer": 1e3 * m * t_f}
    if transfer:
        times["transfer_ms_per_layer"] = 1e3 * 2 * m * t_c
    return {"afd": "1A1F", "micro_batches": m, "spec": {"concurrency": n}, "afd_stage_times": times,
            "tpot": {"mean_ms": 1e3 * tpot}}


def test_fit_measured_recovers_the_linear_model():
    k = {"k1": 9e-5, "k2": 2e-4, "k3": 5e-5, "k4": 1e-4, "kc": 2e-6, "o1": 8e-4, "o0": 5e-3}
    runs = [fake_run(k, n, m) for n in (8, 16, 32, 64) for m in (1, 2, 4)]
    profile = fit_measured(runs + [{"afd": None, "spec": {"concurrency": 8}}], layers=30)
    for name, value in k.items():
        assert getattr(profile, name) == pytest.approx(value, rel=1e-6, abs=1e-12)
    assert profile.runs == 12 and "skipped 1" in profile.notes[0]


def test_fit_measured_one_run_is_proportional():
    k = {"k1": 9e-5, "k2": 0.0, "k3": 5e-5, "k4": 0.0, "kc": 0.0, "o1": 8e-4, "o0": 0.0}
    profile = fit_measured([fake_run(k, 32, 2, transfer=False)], layers=30)
    assert (profile.k1, profile.k3, profile.o1) == (pytest.approx(9e-5), pytest.approx(5e-5), pytest.approx(8e-4))
    assert profile.k2 == profile.k4 == profile.kc == 0
    assert any("proportional" in note for note in profile.notes)
    assert any("t_C = 0" in note for note in profile.notes)


def test_two_cores_fit_only_1a1f():
    k = {"k1": 9e-5, "k2": 2e-4, "k3": 5e-5, "k4": 1e-4, "kc": 2e-6, "o1": 8e-4, "o0": 5e-3}
    profile = fit_measured([fake_run(k, n, 2) for n in (16, 32)], layers=30)
    plans = plan_measured(profile, 30, 0.2, cores=2)
    assert plans and {(p.x, p.y) for p in plans} == {(1, 1)}
    assert all(p.tpot_s <= 0.2 for p in plans)
    assert {(p.x, p.y) for p in plan_measured(profile, 30, 0.2, cores=3)} == {(1, 1), (1, 2), (2, 1)}
    assert plan_measured(profile, 30, 0.2, cores=1) == []


def test_calibration_from_table_9():
    # Step-3 8K on H800, 64 sequences per GPU, BF16 KV: 64 * 8192 * 2 * 256 * 2 B = 536,870,912 B / 3.35e12 =
    # 160.26 us of 281 us measured: 57%. The linear part: 2 * 64 * 169,345,024 FLOPs / 1.98e15 = 10.95 us and
    # 169,345,024 B / 3.35e12 = 50.55 us, so the KV takes 281 - 61.50 = 219.50 us: 73%.
    assert kv_efficiency("H800", kv_only=True) == pytest.approx(160.26 / 281, rel=1e-4)
    assert kv_efficiency("H800") == pytest.approx(160.26 / (281 - 61.50), rel=1e-4)
    assert kv_efficiency("H20", kind="MLA") is None  # FLOP-bound at the roofline


def test_step3_2a2f_headline_within_a_factor_of_two():
    result = step3_2a2f()
    best = result["best"]
    assert np.isfinite(best.tok_s_per_gpu) and best.tpot_s <= 0.05
    assert 0.5 < result["ratio"] < 2
    assert result["at_paper_batch"].bound == "attention"
    calibrated = step3_2a2f(Options(kv_efficiency=kv_efficiency("H800", kv_only=True)))
    assert 1 < calibrated["ratio"] < result["ratio"]
