"""Step-3 (models/step3.py: MFA attention + shared-expert MoE) against a plain-torch reference written here from
the Step-3 paper (arXiv:2507.19427), on tiny random checkpoints saved with safetensors under Step-3's weight names.

    h = rms(x);  [q_lat | k | v] = h W_qkv;  q = rms(q_lat) W_q -> [T, heads, hd];  k, v: ONE head of hd
    q, k = RoPE(q), RoPE(k) over the whole head;  causal softmax(q k^T / sqrt(hd)) v;  x += o W_o
    h2 = rms(x);  x += share_expert(h2) + sum_topk p_e expert_e(h2)   (MoE layers; p = softmax(gate h2))
                  x += mlp(h2)                                         (dense layers)
"""
import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from conftest import (assert_outputs_match_reference, assert_raw_logits_match, greedy_tokens, moe_token,
                      rms_norm, rope, swiglu, write_byte_tokenizer)
from afdserve import LLM, SamplingParams
from afdserve.models.hf_config import load_transformer_config

STEP3_CONFIG = dict(
    architectures=["Step3TextForCausalLM"], model_type="step3_text", vocab_size=128, hidden_size=64,
    intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_attention_groups=1, head_dim=24,
    share_q_dim=40, moe_layers_enum="1,2", moe_num_experts=4, moe_top_k=2, moe_intermediate_size=32,
    share_expert_dim=48, norm_expert_weight=False, rms_norm_eps=1e-5, rope_theta=500000.0,
    max_position_embedding=1024, tie_word_embeddings=False, eos_token_id=2, hidden_act="silu")
# head_dim 24 is not hidden / heads (16): the config's head_dim must be the one used. The second case has Step-3's
# real head_dim of 256 and renormalized expert weights.
CASES = {"small_head": {}, "head_dim_256": dict(num_attention_heads=2, head_dim=256, share_q_dim=32,
                                               norm_expert_weight=True, moe_layers_enum="0,2")}
# With block_size 16: prompts that end inside the first block and cross into the second or third while decoding.
PROMPTS = [[5, 17, 99, 3, 41, 8], list(range(10, 24)), [7], list(range(30, 63))]
NEW_TOKENS = 8


# ---- the reference: the whole model on one sequence, from the HF-named weights ---------------------------------

def reference_logits(w: dict, cfg: dict, ids: list[int]) -> torch.Tensor:
    nh, hd, eps, theta = cfg["num_attention_heads"], cfg["head_dim"], cfg["rms_norm_eps"], cfg["rope_theta"]
    moe_layers = {int(i) for i in cfg["moe_layers_enum"].split(",")}
    T = len(ids)
    positions = torch.arange(T)
    x = w["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q_lat = rms_norm(h @ w[a + "q_proj.weight"].T, w[a + "inter_norm.weight"], eps)
        q = rope((q_lat @ w[a + "wq.weight"].T).view(T, nh, hd), positions, theta)
        k = rope((h @ w[a + "k_proj.weight"].T).view(T, 1, hd), positions, theta)[:, 0]
        v = h @ w[a + "v_proj.weight"].T  # [T, hd]: the one V head every query head reads
        scores = torch.einsum("qhd,kd->hqk", q, k) / math.sqrt(hd)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        attn = torch.einsum("hqk,kd->qhd", scores.softmax(-1), v).reshape(T, nh * hd)
        x = x + attn @ w[a + "o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        ffn = _moe_token if i in moe_layers else _dense_token
        x = x + torch.stack([ffn(w, cfg, p, h[t]) for t in range(T)])
    return rms_norm(x, w["model.norm.weight"], eps) @ w["lm_head.weight"].T


def _projections(w, prefix):
    return tuple(w[f"{prefix}{n}_proj.weight"] for n in ("gate", "up", "down"))


def _dense_token(w, cfg, p, x):
    return swiglu(x, *_projections(w, p + "mlp."))


def _moe_token(w, cfg, p, x):
    gate, up, down = _projections(w, p + "moe.")  # [E, I, H], [E, I, H], [E, H, I]
    experts = [(gate[e], up[e], down[e]) for e in range(cfg["moe_num_experts"])]
    routed = moe_token(x, w[p + "moe.gate.weight"], experts, cfg["moe_top_k"], cfg["norm_expert_weight"])
    return routed + swiglu(x, *_projections(w, p + "share_expert."))


def reference_greedy(w, cfg, prompt, new_tokens):
    return greedy_tokens(lambda ids: reference_logits(w, cfg, ids), prompt, new_tokens)


# ---- the tiny checkpoint ------------------------------------------------------------------------------------------

def make_tiny_step3(directory, seed: int = 0, **overrides) -> tuple[dict, dict]:
    """Random weights under Step-3's checkpoint names (models/step3.py), config.json and a tokenizer."""
    cfg = {**STEP3_CONFIG, **overrides}
    H, V, nh, hd, dq = (cfg[k] for k in ("hidden_size", "vocab_size", "num_attention_heads", "head_dim", "share_q_dim"))
    E, I_moe = cfg["moe_num_experts"], cfg["moe_intermediate_size"]
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, std=0.2, mean=0.0: torch.randn(*shape, generator=g) * std + mean  # noqa: E731
    norm = lambda n: rand(n, std=0.1, mean=1.0)  # noqa: E731

    def mlp(prefix, inter, *experts):
        """A SwiGLU MLP's projections; with `experts` = (E,), all E experts stacked in one tensor each."""
        return {f"{prefix}gate_proj.weight": rand(*experts, inter, H),
                f"{prefix}up_proj.weight": rand(*experts, inter, H),
                f"{prefix}down_proj.weight": rand(*experts, H, inter)}

    w = {"model.embed_tokens.weight": rand(V, H, std=1.0), "model.norm.weight": norm(H), "lm_head.weight": rand(V, H)}
    moe_layers = {int(i) for i in cfg["moe_layers_enum"].split(",")}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        w.update({p + "input_layernorm.weight": norm(H), p + "post_attention_layernorm.weight": norm(H),
                  a + "q_proj.weight": rand(dq, H), a + "k_proj.weight": rand(hd, H), a + "v_proj.weight": rand(hd, H),
                  a + "inter_norm.weight": norm(dq), a + "wq.weight": rand(nh * hd, dq, std=0.3),
                  a + "o_proj.weight": rand(H, nh * hd, std=0.1)})
        if i in moe_layers:
            w[p + "moe.gate.weight"] = rand(E, H, std=1.0)
            w.update(mlp(p + "moe.", I_moe, E))
            w.update(mlp(p + "share_expert.", cfg["share_expert_dim"]))
        else:
            w.update(mlp(p + "mlp.", cfg["intermediate_size"]))
    save_file(w, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(cfg))
    write_byte_tokenizer(directory, V)
    return w, cfg


@pytest.fixture(params=list(CASES))
def tiny_step3(request, tmp_path):
    w, cfg = make_tiny_step3(tmp_path, **CASES[request.param])
    return tmp_path, w, cfg


# ---- tests --------------------------------------------------------------------------------------------------------

def test_step3_config_and_kv_cache_layout(tiny_step3):
    model_dir, _, cfg = tiny_step3
    mc = load_transformer_config(model_dir)
    assert (mc.num_kv_heads, mc.head_dim, mc.max_position_embeddings) == (1, cfg["head_dim"], 1024)
    llm = LLM(str(model_dir), dtype="float32", block_size=16)
    runner = llm.engine.core.executor.runner
    # [2, kv_heads, blocks, block_size, head_dim]: one K and one V head per layer (MQA).
    assert all(c.shape[1] == 1 and c.shape[-1] == cfg["head_dim"] for c in runner.kv_caches)
    moe_layers = {int(i) for i in cfg["moe_layers_enum"].split(",")}
    assert [layer.router is not None for layer in runner.model.layers] == [
        i in moe_layers for i in range(cfg["num_hidden_layers"])]


def test_step3_logits_match_reference_prefill_then_decode(tiny_step3):
    """A 30-token prefill chunk, then one decode step per token: every position's logits within 1e-4."""
    model_dir, w, cfg = tiny_step3
    llm = LLM(str(model_dir), dtype="float32", block_size=16)
    oracle = lambda ids: SimpleNamespace(logits=reference_logits(w, cfg, ids[0].tolist())[None])  # noqa: E731
    assert_raw_logits_match(llm, oracle, list(range(3, 40)))


def test_step3_batched_greedy_equals_reference(tiny_step3):
    model_dir, w, cfg = tiny_step3
    llm = LLM(str(model_dir), dtype="float32", block_size=16)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert_outputs_match_reference(outs, PROMPTS, NEW_TOKENS, lambda ids: reference_logits(w, cfg, ids))


@pytest.mark.parametrize("change,message", [
    (dict(num_attention_groups=2), r"one KV head: the config must set 'num_attention_groups' to 1 \(got 2 KV heads"),
    (dict(num_attention_groups=None), r"'num_attention_groups' to 1 \(got 4 KV heads"),
    (dict(share_q_dim=None), "needs 'share_q_dim'"),
    (dict(moe_layers_enum=None), "lacks 'moe_layers_enum'"),
    (dict(moe_layers_enum="1,5"), r"moe_layers_enum \[5\] outside the model's 3 layers"),
    (dict(moe_layers_enum="1;2"), "must list layer indices"),
    (dict(hidden_act="gelu"), "unsupported MoE expert activation 'gelu'"),
])
def test_bad_step3_config_is_a_clear_error(tmp_path, change, message):
    make_tiny_step3(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(change)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        LLM(str(tmp_path), dtype="float32")


def test_checkpoint_with_wrong_expert_count_is_a_clear_error(tmp_path):
    """The stacked expert tensors must hold moe_num_experts experts; a mismatch names the tensor."""
    make_tiny_step3(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["moe_num_experts"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"checkpoint tensor 'model\.layers\.1\.moe\.[a-z_.]+' has shape \(4, "):
        LLM(str(tmp_path), dtype="float32")


def test_step3_through_afd_1a1f_equals_reference(tmp_path):
    """The FFN worker runs the dense MLPs and the shared + routed experts; routing travels with ffn_input."""
    w, cfg = make_tiny_step3(tmp_path)
    greedy = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    llm = LLM(str(tmp_path), dtype="float32", block_size=16, afd="1A1F", micro_batches=2, afd_transport="shm")
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy, use_tqdm=False)]
    finally:
        llm.engine.shutdown()
    assert got == [reference_greedy(w, cfg, p, NEW_TOKENS) for p in PROMPTS]
