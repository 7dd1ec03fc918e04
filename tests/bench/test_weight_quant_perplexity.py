"""Perplexity of the real SmolLM2 with int8 weight-only linears against its fp32 weights, on English text from the
stdlib (bench/weight_quant.py): within the 1% the README promises, and really changed."""
from afdserve.bench.weight_quant import WeightQuantBenchSpec, run_weight_quant_bench
from afdserve.engine.llm import engine_config


def test_int8_weights_perplexity_within_one_percent(smollm2_dir):
    config = engine_config(str(smollm2_dir), dtype="float32", max_num_seqs=4)
    rows = run_weight_quant_bench(config, WeightQuantBenchSpec((None, "int8"), num_tokens=512, chunk=128))
    full, int8 = rows
    assert int8["perplexity"] != full["perplexity"]
    assert abs(int8["delta_pct"]) < 1.0
    assert int8["weight_mib"] < 0.6 * full["weight_mib"]  # the fp32 embedding table stays: not a quarter
