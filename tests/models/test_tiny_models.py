"""Tiny random Llama-family checkpoints through the whole engine against transformers (the oracle):
greedy tokens equal, and logprobs at every prompt and output position within 1e-4 (fp32)."""
import pytest
import torch

from conftest import hf_greedy, make_tiny_model
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
    llm = LLM(str(tmp_path), dtype="float32", block_size=16)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=TOP, prompt_logprobs=TOP)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)  # all prompts batched together
    for prompt, out in zip(PROMPTS, outs):
        tokens = out.outputs[0].token_ids
        assert tokens == hf_greedy(hf, prompt, NEW_TOKENS)
        with torch.no_grad():
            ref = hf(torch.tensor([prompt + tokens])).logits[0].log_softmax(-1)
        # prompt_logprobs[p] is the distribution that predicted prompt token p (from position p - 1).
        for p in range(1, len(prompt)):
            _assert_close(out.prompt_logprobs[p], ref[p - 1])
        for j, position in enumerate(out.outputs[0].logprobs):
            _assert_close(position, ref[len(prompt) - 1 + j])


def _assert_close(position_logprobs, ref_row):
    for token_id, lp in position_logprobs.items():
        assert abs(lp.logprob - ref_row[token_id].item()) < 1e-4, (token_id, lp.logprob, ref_row[token_id].item())
    top_ref = ref_row.topk(TOP).indices.tolist()
    assert set(top_ref) <= set(position_logprobs)


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
