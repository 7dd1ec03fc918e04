"""Cost per request (`RequestOutput.cost`, the server's `usage.afdserve_cost`): the active-weight count against
transformers' own parameters, and the engine's charges against a hand count from the formulas of
engine/request_cost.py's docstring (linear 2 W t, attention 4 n_q d L x keys attended, KV bytes x keys read)."""
from __future__ import annotations

import pytest

from conftest import make_tiny_model
from afdserve import LLM, SamplingParams
from afdserve.models.hf_config import load_transformer_config
from afdserve.models.param_count import active_params

MOE_OVERRIDES = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48),
    # MLA: the query LoRA, kv_a / kv_b projections; one dense layer, then shared + routed experts
    "deepseek_v3": dict(num_hidden_layers=3, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                        n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1, kv_lora_rank=32,
                        q_lora_rank=48, qk_rope_head_dim=16, qk_nope_head_dim=24, v_head_dim=20),
    "deepseek_v2": dict(num_hidden_layers=2, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                        n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=None,
                        qk_rope_head_dim=16, qk_nope_head_dim=24, v_head_dim=20),
}


def hf_active_weights(model, top_k: int = 0, num_experts: int = 0) -> int:
    """Matmul weights per token from transformers' own parameters: every weight matrix but the embedding, the LM
    head and norms; routed experts' weights scaled by top_k / num_experts (a token passes top_k of them)."""
    total = 0.0
    for name, p in model.named_parameters():
        if p.dim() < 2 or "embed_tokens" in name or "lm_head" in name:
            continue
        routed = ".experts." in name or name.endswith(".experts.gate_up_proj") or name.endswith(".experts.down_proj")
        total += p.numel() * (top_k / num_experts if routed else 1)
    return round(total)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mixtral", "qwen2_moe", "deepseek_v2", "deepseek_v3"])
def test_active_params_match_transformers(tmp_path, arch):
    overrides = MOE_OVERRIDES.get(arch, {})
    hf = make_tiny_model(tmp_path, arch, **overrides)
    params = active_params(load_transformer_config(tmp_path))
    top_k = overrides.get("num_experts_per_tok", 0)
    num_experts = next((overrides[k] for k in ("num_local_experts", "num_experts", "n_routed_experts")
                        if k in overrides), 0)
    assert params.per_token == hf_active_weights(hf, top_k, num_experts)
    assert params.lm_head == hf.config.vocab_size * hf.config.hidden_size


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama-cost")
    make_tiny_model(directory, "llama")
    return directory


# The tiny llama of conftest.TINY_COMMON: H 64, I 128, 2 layers, 4 query heads and 2 KV heads of 16, vocab 256.
H, I, LAYERS, NQ, NKV, D, V = 64, 128, 2, 4, 2, 16, 256
WEIGHTS = LAYERS * (H * NQ * D + 2 * H * NKV * D + NQ * D * H + 3 * H * I)  # Q, K, V, O + gate, up, down
KV_BYTES = 2 * LAYERS * NKV * D * 4  # K and V, fp32, all layers


def hand_cost(chunks: list[tuple[int, int]]) -> tuple[int, int, float]:
    """(linear FLOPs, attention FLOPs, KV bytes read) of chunks (start, tokens), each with one logits row."""
    linear = sum(2 * WEIGHTS * t + 2 * V * H for _, t in chunks)
    attention = sum(4 * NQ * D * LAYERS * sum(i + 1 for i in range(s, s + t)) for s, t in chunks)
    kv = sum(KV_BYTES * (s + t) for s, t in chunks)
    return linear, attention, kv


def test_one_request_costs_its_prefill_and_decodes(tiny):
    llm = LLM(str(tiny), dtype="float32", num_kv_blocks=64)
    prompt, new = list(range(3, 23)), 5  # 20 prompt tokens; the first token comes from the prefill
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=new, ignore_eos=True), use_tqdm=False)[0]
    chunks = [(0, 20)] + [(20 + j, 1) for j in range(new - 1)]
    linear, attention, kv = hand_cost(chunks)
    assert (out.cost.linear_flops, out.cost.attention_flops, out.cost.kv_bytes_read) == (linear, attention, kv)
    assert out.cost.eflops == pytest.approx(linear + attention + 562.5 * kv)
    # the engine's running total is the same work
    assert llm.engine.core.stats().cost.linear_flops == linear


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_n_samples_pay_a_shared_prompt_once(tiny, prefix_caching):
    """n = 4 samples of a 35-token prompt (2 full blocks of 16 + 3): with prefix caching the first sample computes
    the prompt and the other three find its 32-token prefix in the same step, computing only the last 3 tokens."""
    llm = LLM(str(tiny), dtype="float32", num_kv_blocks=64, enable_prefix_caching=prefix_caching)
    prompt, n, new = list(range(3, 38)), 4, 3
    out = llm.generate([prompt], SamplingParams(n=n, temperature=1.0, seed=0, max_tokens=new, ignore_eos=True),
                       use_tqdm=False)[0]
    prefill = [(0, 35)] + [(32, 3) if prefix_caching else (0, 35)] * (n - 1)
    decodes = [(35 + j, 1) for j in range(new - 1)] * n
    linear, attention, kv = hand_cost(prefill + decodes)
    assert (out.cost.linear_flops, out.cost.attention_flops, out.cost.kv_bytes_read) == (linear, attention, kv)


def test_reset_prefix_cache_makes_the_prompt_cost_again(tiny):
    llm = LLM(str(tiny), dtype="float32", num_kv_blocks=64)
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    prompt = list(range(3, 40))  # 37 tokens: 2 full blocks can be found
    first = llm.generate([prompt], params, use_tqdm=False)[0].cost
    cached = llm.generate([prompt], params, use_tqdm=False)[0].cost
    llm.reset_prefix_cache()
    again = llm.generate([prompt], params, use_tqdm=False)[0].cost
    assert cached.linear_flops == hand_cost([(32, 5)])[0] < first.linear_flops == hand_cost([(0, 37)])[0]
    assert again == first
