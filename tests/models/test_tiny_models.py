"""Tiny random Llama-family checkpoints through the whole engine against transformers (the oracle):
greedy tokens equal, and logprobs at every prompt and output position within 1e-4 (fp32)."""
import pytest
import torch

from conftest import generate_and_compare, make_tiny_model
from engine import LLM, SamplingParams

PROMPTS = [[5, 17, 99, 3, 250, 41, 8], list(range(10, 50)), [7]]
NEW_TOKENS = 24
TOP = 5

CASES = {
    "llama": dict(arch="llama"),
    "llama-bias-llama3-rope": dict(arch="llama", attention_bias=True, head_dim=32,
                                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral": dict(arch="mistral"),
    "qwen2": dict(arch="qwen2"),
    "qwen3": dict(arch="qwen3", head_dim=32),
    "llama-tied-mha": dict(arch="llama", tie_word_embeddings=True, num_key_value_heads=4),
}


@pytest.mark.parametrize("case", CASES)
def test_tiny_model_matches_transformers(case, tmp_path):
    kwargs = dict(CASES[case])
    hf = make_tiny_model(tmp_path, kwargs.pop("arch"), **kwargs)
    generate_and_compare(LLM(str(tmp_path), dtype="float32", block_size=16), hf, PROMPTS, NEW_TOKENS, TOP)


@pytest.mark.parametrize("case", ["llama", "qwen2", "qwen3"])
def test_tiny_model_raw_logits_match_transformers(case, tmp_path):
    """The raw logits at every position of a prefill and of the decodes after it, against transformers' forward."""
    from engine.request import Request
    from engine.scheduler import ScheduledRequest

    kwargs = dict(CASES[case])
    hf = make_tiny_model(tmp_path, kwargs.pop("arch"), **kwargs)
    llm = LLM(str(tmp_path), dtype="float32", block_size=16)
    runner = llm.engine.core.executor.runner
    tokens = list(range(3, 40))
    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0]
    request = Request("r", tokens, SamplingParams(temperature=0))
    blocks = list(range(3))  # 48 slots for 37 tokens
    # A 30-token prefill chunk, then the remaining tokens one decode step at a time.
    chunks = [(0, 30)] + [(p, 1) for p in range(30, len(tokens))]
    with torch.no_grad():
        for start, n in chunks:
            batch = runner.build_batch([ScheduledRequest(request, start, n, blocks)])
            hidden = runner.model(batch.input_ids, batch.positions, batch.meta, runner.kv_caches)
            logits = runner.model.compute_logits(hidden)
            assert torch.allclose(logits, ref[start:start + n], atol=1e-4, rtol=0), (start, n)
