"""bench/kinetics.py against hand-derived cases of Kinetics' eFLOPs model (Kinetics, arXiv 2506.05333): costs of a
tiny made-up model written out from the formulas, the attended-token count against a brute-force loop over decode
steps, the Beta coverage proxy against Monte Carlo, a hand-made frontier, the trace loader's errors, and the plots."""
import json

import numpy as np
import pytest

from afdserve.bench.kinetics import (
    QWEN3, AccuracyProxy, KineticsModel, KineticsSpec, attended_token_steps, dense_cost, expected_cost,
    format_kinetics_result, frontier_configs, frontier_from_traces, load_trace_csv, pareto_frontier, plot_analytic,
    plot_frontiers, run_analytic_sweep, sparse_cost)

# P = 10, 2 layers, 2 q heads, 1 kv head, head_dim 1: d_L = 2. I = 10 keeps the numbers small.
TINY = KineticsModel("tiny", params=10, layers=2, q_heads=2, kv_heads=1, head_dim=1)
I = 10


def brute_force_attended(input_len, output_len, budget):
    """Token-steps attended: decode step t (1..L_out) sees min(B, L_in + t) tokens."""
    return sum(min(budget, input_len + t) for t in range(1, output_len + 1))


def test_dense_cost_by_hand():
    # N = 2, L_in = 3, L_out = 4:
    # compute = N [2 P L_out + 2 (2 L_in + L_out) L_out H_q d_L] = 2 [2*10*4 + 2*(6+4)*4*2*2] = 2 [80 + 320] = 800
    # memory  = I 2 (2 L_in + N L_out) L_out H_kv d_L = 10 * 2 * (6 + 8) * 4 * 1 * 2 = 2240
    cost = dense_cost(TINY, 2, 3, 4, intensity=I)
    assert (cost.compute, cost.memory, cost.total) == (800, 2240, 3040)


def test_prompt_kv_is_read_once_for_all_trials():
    # N = 1: memory = 10 * 2 * (6 + 4) * 4 * 2 = 1600; two separate trials would read 3200 > 2240 (shared prompt)
    one, two = dense_cost(TINY, 1, 3, 4, intensity=I), dense_cost(TINY, 2, 3, 4, intensity=I)
    assert one.memory == 1600 and two.memory == 2240 < 2 * one.memory
    assert two.compute == 2 * one.compute  # compute is per trial: nothing shared
    # L_in = 0: N = 1 gives 10 * 2 * 4 * 4 * 2 = 640, N = 2 gives 10 * 2 * 8 * 4 * 2 = 1280 = 2 * 640
    assert dense_cost(TINY, 2, 0, 4, intensity=I).memory == 2 * dense_cost(TINY, 1, 0, 4, intensity=I).memory == 1280


def test_oracle_topk_by_hand_and_the_sign():
    # B = 5, L_in = 3, L_out = 4, N = 2; B - L_in = 2
    # sign -1: kvf = 5*4 - 0.5*2^2 = 18; compute = 2 [80 + 4*18*2*2] = 736; memory = 10 * 4*18*1*2 * 2 = 2880
    # sign +1: kvf = 20 + 2 = 22;        compute = 2 [80 + 4*22*2*2] = 864; memory = 10 * 4*22*1*2 * 2 = 3520
    minus, plus = sparse_cost(TINY, 2, 3, 4, 5, intensity=I), sparse_cost(TINY, 2, 3, 4, 5, sign=1, intensity=I)
    assert (minus.compute, minus.memory) == (736, 2880)
    assert (plus.compute, plus.memory) == (864, 3520)
    with pytest.raises(ValueError, match="sign"):
        sparse_cost(TINY, 1, 3, 4, 5, sign=0)


@pytest.mark.parametrize("input_len,output_len,budget", [(3, 4, 5), (0, 10, 4), (128, 1000, 512), (7, 50, 57)])
def test_minus_sign_is_the_count_of_attended_token_steps(input_len, output_len, budget):
    # B > L_in and B - L_in <= L_out: the steps before the budget fills see L_in + t tokens, the rest B.
    # The brute-force sum is B L_out - m (m - 1) / 2 with m = B - L_in; the formula (an integral) is m / 2 short.
    m = budget - input_len
    brute = brute_force_attended(input_len, output_len, budget)
    assert brute == budget * output_len - m * (m - 1) // 2
    assert attended_token_steps(input_len, output_len, budget) == brute - m / 2
    assert attended_token_steps(input_len, output_len, budget, sign=1) - brute == pytest.approx(m * m - m / 2)


def test_a_budget_within_the_prompt_attends_exactly_the_budget():
    assert attended_token_steps(100, 20, 64) == brute_force_attended(100, 20, 64) == 64 * 20


@pytest.mark.parametrize("input_len,output_len,budget", [(3, 4, 7), (3, 4, 8), (0, 10, 2048), (128, 100, 2048)])
def test_a_budget_past_the_context_costs_dense_attention(input_len, output_len, budget):
    # B >= L_in + L_out: every step attends everything, as dense does; with N = 1 there is no prefix sharing to
    # tell the two apart, so sparse == dense. Both are the integral, L_out / 2 short of the brute-force sum.
    kvf = attended_token_steps(input_len, output_len, budget)
    assert kvf == brute_force_attended(input_len, output_len, budget) - output_len / 2
    assert kvf == input_len * output_len + output_len ** 2 / 2
    sparse, dense = sparse_cost(TINY, 1, input_len, output_len, budget), dense_cost(TINY, 1, input_len, output_len)
    assert (sparse.compute, sparse.memory) == pytest.approx((dense.compute, dense.memory))
    if budget > input_len + output_len:  # the repository's uncapped form falls below dense attention
        uncapped = budget * output_len - 0.5 * (budget - input_len) ** 2
        assert uncapped < kvf


def test_block_topk_by_hand():
    # B = 4 as bs = 2 x k = 2, L_in = 3, L_out = 4, N = 2; B - L_in = 1: kvf = 4*4 - 0.5 = 15.5
    # search compute = N ((2 L_in + L_out) // bs) L_out H_q d_L = 2 * (10 // 2) * 4 * 2 * 2 = 160
    # compute = 2 [80 + 4*15.5*2*2] + 160 = 2 [80 + 248] + 160 = 816
    # memory  = I [4 kvf H_kv d_L N + ((2 L_in + N L_out) // bs) L_out H_kv d_L] = 10 [4*15.5*1*2*2 + 7*4*1*2]
    #         = 10 [248 + 56] = 3040
    cost = sparse_cost(TINY, 2, 3, 4, 4, block_size=2, intensity=I)
    assert (cost.compute, cost.memory) == (816, 3040)
    with pytest.raises(ValueError, match="blocks"):
        sparse_cost(TINY, 2, 3, 4, 5, block_size=2)


def test_expected_cost_is_the_mean_over_trial_lengths():
    # N = 2, L_in = 3. L_out = 2: compute 2 [2*10*2 + 2*(6+2)*2*2*2] = 336, memory 10*2*(6+4)*2*2 = 800
    #                  L_out = 4: compute 800, memory 2240 (test_dense_cost_by_hand)
    cost = expected_cost(TINY, 2, 3, [2, 4], intensity=I)
    assert (cost.compute, cost.memory) == (568, 1520)
    block = expected_cost(TINY, 2, 3, [4], sparse_cost, budget=4, block_size=2, intensity=I)
    assert (block.compute, block.memory) == (816, 3040)
    with pytest.raises(ValueError):
        expected_cost(TINY, 1, 3, [])


def test_qwen3_catalog_kv_bytes_per_token():
    # BF16 K and V: 2 * 2 * H_kv * d_L bytes per token, the KV column of the Qwen3 configurations
    kv = {name: 4 * m.kv_heads * m.d_l for name, m in QWEN3.items()}
    assert kv == {"Qwen3-0.6B": 114688, "Qwen3-1.7B": 114688, "Qwen3-4B": 147456, "Qwen3-8B": 147456,
                  "Qwen3-14B": 163840, "Qwen3-32B": 262144}
    assert [m.params for m in QWEN3.values()] == [0.752e9, 2.03e9, 4.02e9, 8.19e9, 14.77e9, 32.76e9]


@pytest.mark.parametrize("mu,concentration", [(0.3, 1.0), (0.75, 4.0)])
def test_beta_coverage_against_monte_carlo(mu, concentration):
    proxy = AccuracyProxy(accuracy={"m": mu}, concentration=concentration)
    p = np.random.default_rng(0).beta(mu * concentration, (1 - mu) * concentration, size=400_000)
    assert proxy.coverage("m", 1) == pytest.approx(mu)
    for n in (2, 8, 32):
        assert proxy.coverage("m", n) == pytest.approx(1 - np.mean((1 - p) ** n), abs=4e-3)


def test_length_proxy():
    proxy = AccuracyProxy(median_len=1000, sigma=0.5, quantiles=9)
    assert proxy.finish_prob(1000) == pytest.approx(0.5)
    assert proxy.lengths(10 ** 6)[4] == 1000  # the middle quantile is the median
    assert max(proxy.lengths(800)) == 800


# Two problems, three configs (cost, score):    A         B         C
#                                          p1  (1, 0)    (2, 1)    (4, 1)
#                                          p2  (1, .5)   (3, 0)    (4, 1)
RECORDS = [{"problem": p, "config": c, "cost": cost, "score": s} for p, c, cost, s in [
    ("p1", "A", 1, 0.0), ("p1", "B", 2, 1.0), ("p1", "C", 4, 1.0),
    ("p2", "A", 1, 0.5), ("p2", "B", 3, 0.0), ("p2", "C", 4, 1.0)]]
BUDGETS = [0.5, 1, 2, 3, 4, 10]


def test_frontier_by_hand():
    # each problem takes its best affordable config: 0.5 none (0, 0); 1: A (0, .5); 2: p1 B (1), p2 A (.5);
    # 3: the same (p2's B scores 0); 4 and up: C (1, 1)
    assert [s for _, s in pareto_frontier(RECORDS, BUDGETS)] == [0, 0.25, 0.75, 0.75, 1, 1]
    # one config for both problems: A 0.25 from 1; B (1 + 0) / 2 from 2 (p2's B needs 3, scoring 0); C 1 from 4
    assert [s for _, s in pareto_frontier(RECORDS, BUDGETS, by="config")] == [0, 0.25, 0.5, 0.5, 1, 1]
    assert frontier_configs(RECORDS, BUDGETS) == [(0.5, None), (1, "A"), (2, "B"), (3, "B"), (4, "C"), (10, "C")]


def test_smoothing_is_a_window_3_mean_with_mirrored_edges():
    records = [{"problem": "p", "config": "a", "cost": 1, "score": 0.3},
               {"problem": "p", "config": "b", "cost": 2, "score": 0.6}]
    assert [s for _, s in pareto_frontier(records, [0.5, 1, 2])] == [0, 0.3, 0.6]
    # [0, 0, .3, .6, .6] averaged in threes
    assert [s for _, s in pareto_frontier(records, [0.5, 1, 2], smooth=True)] == pytest.approx([0.1, 0.3, 0.5])


def test_analytic_sweep_small():
    spec = KineticsSpec(models=("Qwen3-0.6B", "Qwen3-8B"), trials=(1, 4), gen_budgets=(4096, 16384),
                        kv_budgets=(256,), frontier_points=20, bestofn_output_len=8000)
    result = json.loads(json.dumps(run_analytic_sweep(spec)))
    assert {"spec", "proxy", "constants", "bestofn", "longcot", "frontier", "winner"} <= result.keys()
    assert any("upper bound: sparse attention assumed lossless" in a for a in result["proxy"]["assumptions"])
    assert {r["variant"] for r in result["bestofn"]} == {"dense", "topk256", "block64x4"}
    assert len(result["bestofn"]) == 2 * 3 * 2 and len(result["longcot"]) == 2 * 3 * 2
    for r in result["bestofn"] + result["longcot"]:
        assert r["cost"] == pytest.approx(r["compute"] + r["memory"])
        twin = next(d for d in result[("bestofn" if "n" in r else "longcot")] if d["variant"] == "dense"
                    and d["model"] == r["model"] and d.get("n") == r.get("n") and d.get("gen_budget") == r.get(
                        "gen_budget"))
        assert r["score"] == twin["score"]  # sparse keeps the dense accuracy
    dense = next(r for r in result["bestofn"] if r["config"] == "Qwen3-8B dense n=4")
    assert dense["cost"] == pytest.approx(dense_cost(QWEN3["Qwen3-8B"], 4, 128, 8000).total)
    for task in ("bestofn", "longcot"):
        assert set(result["frontier"][task]) == {"dense", "block", "topk"}
        for family, points in result["frontier"][task].items():
            scores = [s for _, s in points]
            assert scores == sorted(scores) and 0 < scores[-1] <= 1
            assert set(result["winner"][task][family]) <= {None, "Qwen3-0.6B", "Qwen3-8B"}
    text = format_kinetics_result(result)
    assert "Best-of-N" in text and "Long-CoT" in text and "8B" in text


HEADER = "problem,config,model,input_len,output_lens,correct,eflops,wall_s\n"


def test_load_trace_csv_and_frontier(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text(HEADER + "p1,dense-n2,Qwen3-8B,100,1000;3000,1,,2.5\n"
                             "p1,cheap,other,100,500,0.5,1e12,0.5\n")
    rows = load_trace_csv(path)
    assert rows[0]["output_lens"] == [1000, 3000] and rows[0]["eflops_source"] == "analytic dense"
    assert rows[0]["eflops"] == expected_cost(QWEN3["Qwen3-8B"], 2, 100, [1000, 3000]).total
    assert (rows[1]["eflops"], rows[1]["wall_s"], rows[1]["correct"]) == (1e12, 0.5, 0.5)
    frontier = frontier_from_traces(rows, cost="wall_s")
    assert len(frontier) == 60 and frontier[0] == (0.5, 0.5) and frontier[-1] == (pytest.approx(2.5), 1.0)


@pytest.mark.parametrize("text,match", [
    ("", "empty"),
    ("problem,config,model,input_len,output_lens\n", "correct"),
    ("problem,config,model,input_len,output_lens,correct\n", "no rows"),
    ("problem,config,model,input_len,output_lens,correct\np,c,Qwen3-8B,100,10;x,1\n", "line 2, column 'output_lens'"),
    ("problem,config,model,input_len,output_lens,correct\np,c,Qwen3-8B,abc,10,1\n", "line 2, column 'input_len'"),
    ("problem,config,model,input_len,output_lens,correct\np,c,Qwen3-8B,10,10,1.5\n", "column 'correct'"),
    ("problem,config,model,input_len,output_lens,correct\np,c,Llama,100,10,1\n", "line 2, column 'model'"),
])
def test_load_trace_csv_errors(tmp_path, text, match):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_trace_csv(path)


def test_frontier_from_traces_needs_the_cost_column(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("problem,config,model,input_len,output_lens,correct\np,c,Qwen3-8B,100,10,1\n")
    with pytest.raises(ValueError, match="wall_s"):
        frontier_from_traces(load_trace_csv(path), cost="wall_s")


def test_plots_write_png(tmp_path):
    png = plot_frontiers({"a": [(1e12, 0.1), (1e13, 0.5)], "b": [(1e12, 0.2), (1e14, 0.9)]}, tmp_path / "f.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    spec = KineticsSpec(models=("Qwen3-0.6B", "Qwen3-4B"), trials=(1, 8), gen_budgets=(8192, 32768),
                        kv_budgets=(512,), frontier_points=10)
    png = plot_analytic(run_analytic_sweep(spec), tmp_path / "a.png")
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
