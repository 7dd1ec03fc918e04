"""The real SmolLM2-135M (imported from its GGUF) against transformers' generate on the same weights:
greedy fp32 token ids equal for 8 prompts x 64 new tokens, each alone and all batched with other requests,
with prefix caching on and off."""
import pytest

from conftest import hf_greedy
from afdserve import LLM, SamplingParams

NEW_TOKENS = 64
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    SYSTEM + "<|im_start|>user\nWhat is the tallest mountain on Earth?<|im_end|>\n<|im_start|>assistant\n",
    SYSTEM + "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, in a small village nestled between two mountains, there lived",
    "Photosynthesis is the process by which",
    "1, 2, 3, 5, 8, 13,",
    "Les pommes de terre sont",
]
FILLERS = ["Hello", "A long time ago " * 12, "import numpy as np\n" * 3]


@pytest.fixture(scope="module")
def reference(hf_smollm2, smollm2_dir):
    from afdserve.engine.tokenizer import Tokenizer
    tok = Tokenizer(smollm2_dir)
    ids = [tok.encode(p) for p in PROMPTS]
    return ids, [hf_greedy(hf_smollm2, p, NEW_TOKENS) for p in ids]


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_greedy_matches_transformers_alone_and_batched(reference, smollm2_dir, prefix_caching):
    prompt_ids, expected = reference
    llm = LLM(str(smollm2_dir), dtype="float32", enable_prefix_caching=prefix_caching)
    greedy = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for ids, want in zip(prompt_ids, expected):
        assert llm.generate([ids], greedy, use_tqdm=False)[0].outputs[0].token_ids == want
    # All eight at once, interleaved with requests of other lengths and budgets (batch invariance).
    mixed = [FILLERS[0]] + prompt_ids[:4] + [FILLERS[1]] + prompt_ids[4:] + [FILLERS[2]]
    params = [SamplingParams(temperature=0, max_tokens=7 * (i + 1), ignore_eos=True) if isinstance(p, str)
              else greedy for i, p in enumerate(mixed)]
    outs = llm.generate(mixed, params, use_tqdm=False)
    got = [o.outputs[0].token_ids for p, o in zip(mixed, outs) if not isinstance(p, str)]
    assert got == expected
    if prefix_caching:  # the two chat prompts share the system prompt; repeats hit the cache
        assert llm.engine.core.kv.prefix_hits > 0
    assert llm.engine.core.kv.num_free_blocks == llm.engine.num_kv_blocks
