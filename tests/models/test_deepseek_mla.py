"""DeepSeek-V2 and DeepSeek-V3 (MLA attention over a latent KV cache, DeepSeekMoE FFN): tiny random checkpoints made
with transformers' own DeepseekV2ForCausalLM / DeepseekV3ForCausalLM and save_pretrained, which are the oracle.
Greedy tokens equal and logprobs at every prompt and output position within 1e-4 (fp32), all prompts batched; raw
logits of a prefill chunk and the decodes after it; the same tokens under AFD 1A2F; the cache holds
kv_lora_rank + qk_rope_head_dim values a token and layer."""
import json

import pytest
import torch

from conftest import assert_raw_logits_match, generate_and_compare, make_tiny_model
from afdserve import LLM, SamplingParams
from afdserve.models.layers.mla import MLAttention

PROMPTS = [[5, 17, 99, 3, 250, 41, 8], list(range(10, 50)), [7]]
NEW_TOKENS = 16
TOP = 5
MLP_STD = 0.1  # FFN weights large enough that routing and experts dominate the logits
# MLA shapes unlike each other so that a swapped split fails: latent 32 + rope 16 cached; nope 24, v 20 per head.
MLA = dict(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_rope_head_dim=16,
           qk_nope_head_dim=24, v_head_dim=20, first_k_dense_replace=1, moe_intermediate_size=32, n_routed_experts=8,
           n_shared_experts=1, num_experts_per_tok=2)
CASES = {
    "v2-q-lora-group-limited": dict(arch="deepseek_v2", q_lora_rank=48, topk_method="group_limited_greedy", n_group=4,
                                    topk_group=2, routed_scaling_factor=1.5),
    "v2-lite-no-q-lora": dict(arch="deepseek_v2", q_lora_rank=None, topk_method="greedy"),
    "v3-noaux-tc": dict(arch="deepseek_v3", q_lora_rank=48, n_group=4, topk_group=2, norm_topk_prob=True,
                        routed_scaling_factor=2.5),
    # YaRN: frequencies, cos/sin scaled by mscale(mscale) / mscale(mscale_all_dim), the softmax scale by
    # mscale(mscale_all_dim)^2. DeepSeek-V3 ships mscale = mscale_all_dim = 1 (a ratio of 1); distinct here so that
    # both scalings show.
    "v3-yarn": dict(arch="deepseek_v3", q_lora_rank=48, n_group=4, topk_group=2, max_position_embeddings=2048,
                    rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, mscale=1.0,
                                         mscale_all_dim=0.5, original_max_position_embeddings=512, beta_fast=32,
                                         beta_slow=1)),
}


def make_tiny_deepseek_mla(directory, case: str):
    kwargs = {**MLA, **CASES[case]}
    hf = make_tiny_model(directory, kwargs.pop("arch"), mlp_std=MLP_STD, **kwargs)
    with torch.no_grad():  # a selection bias that changes choices (transformers initializes it to zero)
        for name, buf in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.1)
    hf.save_pretrained(directory)
    return hf


@pytest.mark.parametrize("case", CASES)
def test_tiny_deepseek_matches_transformers(case, tmp_path):
    hf = make_tiny_deepseek_mla(tmp_path, case)
    with LLM(str(tmp_path), dtype="float32", block_size=16) as llm:
        generate_and_compare(llm, hf, PROMPTS, NEW_TOKENS, TOP)
        model = llm.engine.core.executor.runner.model
        assert all(isinstance(layer.self_attn, MLAttention) for layer in model.layers)


@pytest.mark.parametrize("case", ["v2-q-lora-group-limited", "v3-yarn"])
def test_tiny_deepseek_raw_logits_match_transformers(case, tmp_path):
    """A 30-token prefill chunk, then one decode at a time, each position's logits against transformers' forward."""
    hf = make_tiny_deepseek_mla(tmp_path, case)
    with LLM(str(tmp_path), dtype="float32", block_size=16) as llm:
        assert_raw_logits_match(llm, hf, list(range(3, 60)))


def test_mla_cache_holds_the_latent_alone(tmp_path):
    """KV bytes per token = (kv_lora_rank + qk_rope_head_dim) x dtype bytes x layers: in the allocated caches, in
    the block sizing, and nothing per head."""
    make_tiny_deepseek_mla(tmp_path, "v3-noaux-tc")
    for dtype, elem in (("float32", 4), ("bfloat16", 2)):
        with LLM(str(tmp_path), dtype=dtype, block_size=16, num_kv_blocks=20) as llm:
            runner = llm.engine.core.executor.runner
            expected = (MLA["kv_lora_rank"] + MLA["qk_rope_head_dim"]) * elem * MLA["num_hidden_layers"]
            assert llm.engine.kv_spec.block_bytes == 16 * expected
            # 20 blocks + the pad block of CUDA-graph padding rows (engine/model_runner.py)
            cache_bytes = sum(c.numel() * c.element_size() for c in runner.kv_caches)
            assert cache_bytes == 21 * 16 * expected


def test_tiny_deepseek_v3_through_afd_1a2f_equals_transformers(tmp_path):
    """Attention worker: MLA and the latent cache, the router; two FFN workers: the dense MLP of layer 0 and the
    shared + routed experts, sharded; two micro-batches."""
    from conftest import hf_greedy
    hf = make_tiny_deepseek_mla(tmp_path, "v3-noaux-tc")
    greedy = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    llm = LLM(str(tmp_path), dtype="float32", block_size=16, afd="1A2F", micro_batches=2, afd_transport="shm")
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy, use_tqdm=False)]
    finally:
        llm.engine.shutdown()
    assert got == [hf_greedy(hf, p, NEW_TOKENS) for p in PROMPTS]


def test_v3_multi_token_prediction_layer_is_skipped(tmp_path):
    """DeepSeek-V3 checkpoints carry an MTP layer as `model.layers.{num_hidden_layers}`; it is not served."""
    from safetensors.torch import load_file, save_file
    hf = make_tiny_deepseek_mla(tmp_path, "v3-noaux-tc")
    state = load_file(str(tmp_path / "model.safetensors"))
    state.update({k.replace("layers.2.", "layers.3."): v.clone() for k, v in state.items() if "layers.2." in k})
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with LLM(str(tmp_path), dtype="float32", block_size=16) as llm:
        out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    from conftest import hf_greedy
    assert out[0].outputs[0].token_ids == hf_greedy(hf, PROMPTS[0], 4)


@pytest.mark.parametrize("field", ["kv_lora_rank", "v_head_dim"])
def test_missing_mla_field_is_named(field, tmp_path):
    make_tiny_deepseek_mla(tmp_path, "v2-lite-no-q-lora")
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg[field]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"lacks MLA fields '{field}'"):
        LLM(str(tmp_path), dtype="float32")


@pytest.mark.parametrize("option, message", [
    (dict(kv_cache_dtype="int8"), "kv_cache_dtype 'int8' quantizes K and V; DeepseekV3ForCausalLM's MLA cache"),
    (dict(attention_policy="quest"), "attention_policy 'quest' selects K pages per KV head"),
])
def test_options_the_latent_cache_cannot_take_are_named(option, message, tmp_path):
    make_tiny_deepseek_mla(tmp_path, "v3-noaux-tc")
    with pytest.raises(ValueError, match=message):
        LLM(str(tmp_path), dtype="float32", **option)


def test_request_cost_counts_the_absorbed_attention_and_latent_reads(tmp_path):
    """usage.afdserve_cost for MLA, by hand: per query position and key, each head scores the whole cached entry
    (2 x 48 FLOPs) and weighs its latent (2 x 32); each key read is 48 values of 4 bytes in each of 3 layers."""
    make_tiny_deepseek_mla(tmp_path, "v2-q-lora-group-limited")
    latent, rank, heads, layers = 48, 32, MLA["num_attention_heads"], MLA["num_hidden_layers"]
    with LLM(str(tmp_path), dtype="float32", block_size=16) as llm:
        out = llm.generate([list(range(3, 23))], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                           use_tqdm=False)[0]
    chunks = [(0, 20), (20, 1), (21, 1)]
    keys = sum(sum(i + 1 for i in range(s, s + t)) for s, t in chunks)
    assert out.cost.attention_flops == (2 * latent + 2 * rank) * heads * layers * keys
    assert out.cost.kv_bytes_read == latent * 4 * layers * sum(s + t for s, t in chunks)


def test_decode_graph_buckets_with_padding_give_transformers_tokens(tmp_path):
    """MLA decodes through DecodeGraphs' static buffers (plain calls standing in for graphs, engine/cuda_graphs.py):
    3 requests ending at different steps run in the 4-row bucket with padding rows, then in smaller ones; padding
    rows write the pad block only."""
    from conftest import graphed_llm, hf_greedy
    hf = make_tiny_deepseek_mla(tmp_path, "v3-noaux-tc")
    llm, replayed = graphed_llm(tmp_path, (1, 4))
    new_tokens = [9, 5, 2]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in new_tokens]
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf, p, n) for p, n in zip(PROMPTS, new_tokens)]
    assert {1, 4} <= set(replayed)
    runner, block_size = llm.engine.core.executor.runner, llm.engine.config.cache.block_size
    written = [b for b in range(runner.pad_block + 1) if runner.kv_caches[0][:, :, b].abs().sum() > 0]
    needed = sum(-(-(len(p) + n) // block_size) for p, n in zip(PROMPTS, new_tokens))
    assert written[-1] == runner.pad_block and len(written) - 1 <= needed  # the requests' blocks and the pad block


def test_yarn_without_its_original_context_is_named(tmp_path):
    make_tiny_deepseek_mla(tmp_path, "v3-yarn")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_parameters"].pop("original_max_position_embeddings")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rope scaling 'yarn' needs 'factor' and 'original_max_position_embeddings'"):
        LLM(str(tmp_path), dtype="float32")


def test_chunked_prefills_and_prefix_hits_match_transformers(tmp_path):
    """Prefill chunks of at most 16 tokens (a chunk attends to the chunks before it: the decompressed form's
    offset mask) and a shared 32-token prefix found in the cache."""
    hf = make_tiny_deepseek_mla(tmp_path, "v3-noaux-tc")
    shared = list(range(10, 42))
    prompts = [shared + [7, 8, 9], list(range(50, 90)), shared + [99, 100]]
    from conftest import hf_greedy
    with LLM(str(tmp_path), dtype="float32", block_size=16, max_num_batched_tokens=16) as llm:
        generate_and_compare(llm, hf, prompts[:2], 8, TOP)
        # After the first finished its blocks are cached (a request without prompt logprobs may use them).
        greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        assert llm.generate(prompts[2:], greedy, use_tqdm=False)[0].outputs[0].token_ids == hf_greedy(hf, prompts[2], 8)
        assert llm.engine.core.kv.prefix_hits >= 32
