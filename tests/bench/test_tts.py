"""The measured test-time-scaling sweep (bench/tts.py) on SmolLM2: the task's answers, the voting rules, and that
N samples of a problem pay its prompt once (prefix sharing), with costs from usage.afdserve_cost."""
from __future__ import annotations

import re

import pytest

from afdserve import LLM
from afdserve.bench.kinetics import frontier_from_traces, load_trace_csv
from afdserve.bench.tts import TTSSpec, addition_problems, majority, run_tts_sweep, write_trace_csv


def test_problems_answer_their_last_line():
    for p in addition_problems(20, seed=3):
        a, b = map(int, re.fullmatch(r"(\d+) \+ (\d+) =", p.prompt.splitlines()[-1]).groups())
        assert p.answer == str(a + b)
        for line in p.prompt.splitlines()[:-1]:  # the shots are right too
            x, y, z = map(int, re.fullmatch(r"(\d+) \+ (\d+) = (\d+)", line).groups())
            assert x + y == z


def test_majority_takes_the_most_frequent_then_the_first_seen():
    assert majority(["7", "8", "8"]) == "8"
    assert majority(["9", "8", "8", "9"]) == "9"
    assert majority([""]) == ""


def test_sweep_costs_and_rules_on_smollm2(smollm2_dir, tmp_path):
    with LLM(str(smollm2_dir), dtype="float32", num_kv_blocks=128) as llm:
        result = run_tts_sweep(llm, TTSSpec(num_problems=3, trials=(1, 4), max_tokens=3))
    rows = result["rows"]
    by = {(r["problem"], r["config"]): r for r in rows}
    for i in range(3):
        one, four = by[(i, "best_of_n N=1")], by[(i, "best_of_n N=4")]
        assert one["eflops"] == by[(i, "majority N=1")]["eflops"]
        assert one["correct"] == by[(i, "majority N=1")]["correct"]  # one sample: both rules agree
        assert four["correct"] >= by[(i, "majority N=4")]["correct"]  # a right majority is a right sample
        # four samples decode four times and share the prompt's full blocks: problem 0, scheduled first, pays the
        # few-shot blocks once for its four samples; the others find them cached by problem 0 either way
        assert one["eflops"] < four["eflops"] <= 4 * one["eflops"]
        assert len(four["output_lens"].split(";")) == 4
    assert by[(0, "best_of_n N=4")]["eflops"] < 4 * by[(0, "best_of_n N=1")]["eflops"]
    trace = load_trace_csv(write_trace_csv(rows, tmp_path / "t.csv"))
    assert {r["eflops_source"] for r in trace} == {"csv"}
    frontier = frontier_from_traces(trace, "eflops")
    # at the largest budget every configuration is affordable: each problem counts if any configuration got it
    assert frontier[-1][1] == pytest.approx(sum(max(r["correct"] for r in rows if r["problem"] == i)
                                                for i in range(3)) / 3)
