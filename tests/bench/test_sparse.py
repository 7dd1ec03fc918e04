"""`afdserve bench sparse` on a tiny random Llama with SmolLM2's tokenizer: the dense row's decode perplexity against
transformers teacher-forced on the same tokens, and a Quest row's attended fraction against the count of tokens its
budget reads, worked out here from the page rule."""
import json
import math
import shutil

import torch

from conftest import make_tiny_model
from afdserve.bench.kv_quant import english_text
from afdserve.bench.sparse import SparseBenchSpec, format_sparse_result, run_sparse_bench
from afdserve.engine.llm import engine_config

CONTEXT, SCORED, PAGE = 96, 32, 16


def test_bench_sparse_scores_decodes_as_transformers_and_counts_the_pages_read(smollm2_dir, tmp_path):
    vocab = json.loads((smollm2_dir / "config.json").read_text())["vocab_size"]
    hf = make_tiny_model(tmp_path, "llama", vocab_size=vocab)  # 2 layers
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, tmp_path / name)
    hyper_covering = {"name": "hyperattention", "block_tokens": 4096, "min_seq_len": 0}
    hyper_small = {"name": "hyperattention", "block_tokens": 8, "sample_tokens": 8, "min_seq_len": 32}
    spec = SparseBenchSpec(policies=({"name": "dense"}, {"name": "quest", "budget_pages": 2, "dense_layers": 1},
                                     {"name": "quest", "budget_pages": 64, "dense_layers": 0}, hyper_covering,
                                     hyper_small),
                           contexts=(CONTEXT,), scored_tokens=SCORED, depths=(0.5,), trials=1, chunk=32,
                           prefill_reps=1)
    result = run_sparse_bench(engine_config(str(tmp_path), dtype="float32", block_size=PAGE,
                                            max_num_batched_tokens=CONTEXT), spec)
    dense, small, covering = result["rows"][:3]
    print(format_sparse_result(result))

    from transformers import AutoTokenizer
    ids = AutoTokenizer.from_pretrained(tmp_path).encode(english_text())[:CONTEXT]
    with torch.no_grad():
        logprobs = hf(torch.tensor([ids])).logits[0].log_softmax(-1)
    scored = range(CONTEXT - SCORED, CONTEXT - 1)  # position p predicts token p + 1
    want = math.exp(-sum(logprobs[p, ids[p + 1]].item() for p in scored) / len(scored))
    assert abs(dense["perplexity"] / want - 1) < 1e-4
    assert dense["attended_fraction"] == 1.0 and abs(covering["perplexity"] / want - 1) < 1e-4
    assert covering["attended_fraction"] == 1.0

    # Quest on 2 pages from layer 1: a decode at position p holds p + 1 tokens and reads the first (dense) layer
    # whole, the second through 2 pages, the last one partial.
    held = read = 0
    for p in scored:
        n = p + 1
        last = n - PAGE * ((n - 1) // PAGE)
        held += 2 * n
        read += n + min(n, PAGE + last)
    assert abs(small["attended_fraction"] - read / held) < 1e-9
    assert small["perplexity"] != dense["perplexity"]
    # Its first layer reads every page, so no page goes unread in a step.
    assert small["unread_page_fraction"] == 0.0 and dense["unread_page_fraction"] == 0.0
    assert set(small["passkey"]) == {"0.5"} and 0 <= small["passkey"]["0.5"] <= 1

    # Prefill rows: dense and the two HyperAttention policies (Quest has no prefill of its own), each the context as
    # one chunk, scored over its last half: dense and the covering budget are transformers'; the small one is not.
    prefill = {r["policy"]: r for r in result["prefill_rows"]}
    assert len(prefill) == 3
    second_half = range(CONTEXT // 2, CONTEXT - 1)
    want = math.exp(-sum(logprobs[p, ids[p + 1]].item() for p in second_half) / len(second_half))
    dense_prefill = prefill["dense"]
    assert abs(dense_prefill["perplexity"] / want - 1) < 1e-4 and dense_prefill["speedup"] == 1.0
    covering_prefill, small_prefill = (r for label, r in prefill.items() if label != "dense")
    assert abs(covering_prefill["perplexity"] / want - 1) < 1e-4
    assert abs(small_prefill["perplexity"] / want - 1) > 1e-3
    assert all(r["prefill_s"] > 0 and r["attention_ms"] > 0 for r in prefill.values())
