"""Tiny random Llama-family checkpoints through the whole engine against transformers (the oracle):
greedy tokens equal, and logprobs at every prompt and output position within 1e-4 (fp32)."""
import pytest

from conftest import assert_raw_logits_match, generate_and_compare, make_tiny_model
from afdserve import LLM

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
    kwargs = dict(CASES[case])
    hf = make_tiny_model(tmp_path, kwargs.pop("arch"), **kwargs)
    assert_raw_logits_match(LLM(str(tmp_path), dtype="float32", block_size=16), hf, list(range(3, 40)))
