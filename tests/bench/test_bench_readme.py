"""`afdserve bench readme` on a tiny random Llama with SmolLM2's tokenizer: the dense row's perplexity against
transformers on the same held-out tokens, every expert on equal to dense, top-1 routing not; the expert-cache rows
against Belady's and LRU's properties."""
import json
import math
import shutil

import torch

from conftest import make_tiny_model
from afdserve.bench.kv_quant import english_text
from afdserve.bench.readme import ReadMEBenchSpec, format_readme_result, run_readme_bench
from afdserve.models.readme_refactor import RefactorSpec


def test_bench_readme_scores_the_dense_model_as_transformers_and_every_expert_as_dense(smollm2_dir, tmp_path):
    vocab = json.loads((smollm2_dir / "config.json").read_text())["vocab_size"]
    hf = make_tiny_model(tmp_path, "llama", vocab_size=vocab, mlp_std=0.2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, tmp_path / name)
    spec = ReadMEBenchSpec(RefactorSpec(num_experts=4, calibration_tokens=128, router_steps=20,
                                        router_hidden_size=16, router_intermediate_size=16), top_ks=(1,),
                           eval_tokens=64, cache_tokens=256, concurrencies=(1, 8), latency_capacities=(2,),
                           latency_prompt_tokens=8, latency_output_tokens=4, latency_repeats=1)
    result = run_readme_bench(tmp_path, spec)
    print(format_readme_result(result))
    rows = {(r["model"], r["top_k"]): r for r in result["rows"]}
    assert list(rows) == [("dense", None), ("read-me, router untrained", 4), ("read-me, router untrained", 1),
                          ("read-me, router trained", 4), ("read-me, router trained", 1)]

    from transformers import AutoTokenizer
    ids = AutoTokenizer.from_pretrained(tmp_path).encode(english_text())
    start = result["spec"]["eval_start"]
    assert start == len(ids) // 2
    held_out = ids[start:start + 64]
    with torch.no_grad():
        logprobs = hf(torch.tensor([held_out])).logits[0].log_softmax(-1)
    want = math.exp(-sum(logprobs[p - 1, held_out[p]].item() for p in range(1, 64)) / 63)
    dense = rows[("dense", None)]["perplexity"]
    assert abs(dense / want - 1) < 1e-4
    for router in ("untrained", "trained"):
        assert abs(rows[(f"read-me, router {router}", 4)]["perplexity"] / dense - 1) < 1e-5
        assert abs(rows[(f"read-me, router {router}", 1)]["perplexity"] / dense - 1) > 1e-3
    assert rows[("read-me, router untrained", 1)]["router_training"]["steps"] == 0

    # Expert cache: Belady with the whole trace never below LRU, never worse with more room; with room for every
    # expert only the first use of each misses, whatever the policy.
    cache = {(r["concurrency"], r["capacity"], r["policy"]): r for r in result["cache_rows"]}
    assert {c for c, _, _ in cache} == {1, 8} and {k for _, k, _ in cache} == {1, 2, 3, 4}
    for concurrency in (1, 8):
        full = [cache[(concurrency, k, "belady, whole trace")]["hit_rate"] for k in (1, 2, 3, 4)]
        assert full == sorted(full)
        for k in (1, 2, 3, 4):
            assert full[k - 1] >= cache[(concurrency, k, "lru")]["hit_rate"]
        assert len({cache[(concurrency, 4, p)]["hit_rate"] for p in ("lru", "belady, next step",
                                                                     "belady, whole trace")}) == 1

    # Step latency: every setting ran 3 decode-only steps (the prefill step samples the first of 4 tokens); with
    # every expert resident there is no cache, with 2 of 4 both policies count hits and misses and load experts.
    latency = {(r["concurrency"], r["capacity"], r["policy"], r["prefetch"], r["expert_batch_size"]): r
               for r in result["latency_rows"]}
    assert list(latency) == [(c, *setting) for c in (1, 8) for setting in (
        (None, None, False, None), (2, "lru", False, None), (2, "belady", False, None), (2, "belady", True, None),
        *([(2, "belady", False, 4)] if c == 8 else []))]
    batched = latency[(8, 2, "belady", False, 4)]
    assert batched["decode_tok_per_s"] > 0 and batched["decode_steps"] > 3  # 4 of 8 decodes a step: more steps
    latency = {key[:3]: r for key, r in latency.items() if key[4] is None and not key[3]}
    assert all(r["decode_steps"] == 3 and r["step_median_ms"] > 0 for r in latency.values())
    assert all(latency[(c, None, None)]["hit_rate"] is None for c in (1, 8))
    assert all(0 <= latency[(c, 2, p)]["hit_rate"] <= 1 and latency[(c, 2, p)]["load_s"] > 0
               for c in (1, 8) for p in ("lru", "belady"))
