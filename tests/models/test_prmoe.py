"""PRMoE (DeepSpeed-MoE Pyramid-Residual MoE, models/prmoe.py) against naive references written here from the math:
the Residual-MoE and pyramid-MoE layers token by token, and a tiny random checkpoint (written with safetensors)
through the engine and through `afdserve serve`, against a plain-torch forward of the whole model.

    residual MoE:  y = moe(x) * c[0] + mlp(x) * c[1],  c = softmax(W_c x + b_c),  moe(x) = sum_j p_j * expert_j(x)
    expert / mlp:  down @ (silu(gate @ x) * (up @ x));  p = softmax(W_g x), top-k (ties: lowest id), top-1 unnormalized
"""
import json
import math
from types import SimpleNamespace

import httpx
import pytest
import torch
from safetensors.torch import save_file

from conftest import (assert_outputs_match_reference, assert_raw_logits_match, greedy_tokens, moe_token, rms_norm,
                      rope, swiglu, write_byte_tokenizer)
from afdserve import LLM, SamplingParams
from afdserve.models.hf_config import load_transformer_config
from afdserve.models.layers.moe import MoEBlock
from afdserve.models.layers.moe_router import Router, RouterConfig
from afdserve.models.registry import build_model
from server.server_process import MODEL_NAME, ServerProcess

PRMOE_CONFIG = dict(
    architectures=["PRMoEForCausalLM"], model_type="prmoe", vocab_size=128, hidden_size=32, intermediate_size=48,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
    max_position_embeddings=2048, tie_word_embeddings=False, eos_token_id=2, hidden_act="silu",
    moe_layers=[1, 3], num_experts_per_layer=[4, 8], expert_intermediate_size=24, moe_top_k=1, residual_moe=True)
PROMPTS = [[5, 17, 99, 3, 41, 8], list(range(10, 30)), [7]]
NEW_TOKENS = 8


# ---- the naive reference of the whole model (swiglu, moe_token, rms_norm, rope: tests/conftest.py) ------------

def reference_logits(w: dict, cfg: dict, ids: list[int]) -> torch.Tensor:
    """Logits [T, V] of the whole PRMoE model on one sequence, from the HF-named weights."""
    nh, nkv, eps = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["rms_norm_eps"]
    d = cfg["hidden_size"] // nh
    T = len(ids)
    x = w["model.embed_tokens.weight"][ids]
    positions = torch.arange(T)
    experts_of = dict(zip(cfg["moe_layers"], cfg["num_experts_per_layer"]))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = rope((h @ w[p + "self_attn.q_proj.weight"].T).view(T, nh, d), positions, cfg["rope_theta"])
        k = rope((h @ w[p + "self_attn.k_proj.weight"].T).view(T, nkv, d), positions, cfg["rope_theta"])
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(T, nkv, d)
        k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(T, nh * d)
        x = x + attn @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        x = x + torch.stack([_ffn_token(w, cfg, p, experts_of.get(i), h[t]) for t in range(T)])
    return rms_norm(x, w["model.norm.weight"], eps) @ w["lm_head.weight"].T


def _ffn_token(w, cfg, p, num_experts, x):
    mlp = lambda prefix: tuple(w[f"{prefix}{n}_proj.weight"] for n in ("gate", "up", "down"))  # noqa: E731
    if num_experts is None:
        return swiglu(x, *mlp(p + "mlp."))
    experts = [mlp(f"{p}mlp.experts.{e}.") for e in range(num_experts)]
    residual = None
    if cfg["residual_moe"]:
        residual = (*mlp(p + "mlp.residual_mlp."), w[p + "mlp.coefficient.weight"], w[p + "mlp.coefficient.bias"])
    top_k = cfg["moe_top_k"]
    return moe_token(x, w[p + "mlp.gate.weight"], experts, top_k, cfg.get("norm_topk_prob", top_k > 1), residual)


def reference_greedy(w, cfg, prompt, new_tokens):
    return greedy_tokens(lambda ids: reference_logits(w, cfg, ids), prompt, new_tokens)


# ---- the tiny checkpoint --------------------------------------------------------------------------------------------

def make_tiny_prmoe(directory, seed: int = 0, **overrides) -> tuple[dict, dict]:
    """Random HF-named weights (models/prmoe.py's layout) saved with safetensors, config.json and a tokenizer."""
    cfg = {**PRMOE_CONFIG, **overrides}
    H, V, nh, nkv = cfg["hidden_size"], cfg["vocab_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d, I_dense, I_exp = H // nh, cfg["intermediate_size"], cfg["expert_intermediate_size"]
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, std=0.2, mean=0.0: torch.randn(*shape, generator=g) * std + mean  # noqa: E731

    def mlp(prefix, inter):
        return {f"{prefix}gate_proj.weight": rand(inter, H), f"{prefix}up_proj.weight": rand(inter, H),
                f"{prefix}down_proj.weight": rand(H, inter)}

    w = {"model.embed_tokens.weight": rand(V, H, std=1.0), "model.norm.weight": rand(H, std=0.1, mean=1.0),
         "lm_head.weight": rand(V, H)}
    experts_of = dict(zip(cfg["moe_layers"], cfg["num_experts_per_layer"]))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w.update({p + "input_layernorm.weight": rand(H, std=0.1, mean=1.0),
                  p + "post_attention_layernorm.weight": rand(H, std=0.1, mean=1.0),
                  p + "self_attn.q_proj.weight": rand(nh * d, H), p + "self_attn.k_proj.weight": rand(nkv * d, H),
                  p + "self_attn.v_proj.weight": rand(nkv * d, H), p + "self_attn.o_proj.weight": rand(H, nh * d)})
        if i not in experts_of:
            w.update(mlp(p + "mlp.", I_dense))
            continue
        w[p + "mlp.gate.weight"] = rand(experts_of[i], H, std=1.0)
        for e in range(experts_of[i]):
            w.update(mlp(f"{p}mlp.experts.{e}.", I_exp))
        if cfg["residual_moe"]:
            w.update(mlp(p + "mlp.residual_mlp.", I_exp))
            w.update({p + "mlp.coefficient.weight": rand(2, H, std=0.5), p + "mlp.coefficient.bias": rand(2)})
    save_file(w, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(cfg))
    write_byte_tokenizer(directory, V)
    return w, cfg


# ---- tests ----------------------------------------------------------------------------------------------------------

def _random_params(module, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _block_params(block: MoEBlock, router: Router):
    I = block.experts.w2.shape[2]
    w13, w2 = block.experts.w13.detach(), block.experts.w2.detach()
    experts = [(w13[e, :I], w13[e, I:], w2[e]) for e in range(w13.shape[0])]
    residual = None
    if block.residual_mlp is not None:
        gate, up = block.residual_mlp.gate_up_proj.weight.detach().chunk(2)
        residual = (gate, up, block.residual_mlp.down_proj.weight.detach(),
                    block.coefficient.weight.detach(), block.coefficient.bias.detach())
    return router.gate.weight.detach(), experts, residual


@pytest.mark.parametrize("top_k,renormalize", [(1, False), (2, True), (2, False)])
def test_residual_moe_layer_matches_naive_reference(top_k, renormalize):
    H, E, I = 32, 6, 24
    router = Router(H, RouterConfig(num_experts=E, top_k=top_k, renormalize=renormalize))
    block = MoEBlock(H, E, I, residual_intermediate_size=I)
    _random_params(router, 1)
    _random_params(block, 2)
    x = torch.randn(13, H, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = block(x, router(x))
    gate_w, experts, residual = _block_params(block, router)
    ref = torch.stack([moe_token(x[t], gate_w, experts, top_k, renormalize, residual) for t in range(len(x))])
    assert torch.allclose(out, ref, atol=1e-5, rtol=0)
    # Both terms matter: the mix differs from either part alone.
    no_residual = torch.stack([moe_token(x[t], gate_w, experts, top_k, renormalize) for t in range(len(x))])
    assert (out - no_residual).abs().max() > 1e-2


def test_pyramid_moe_layers_have_their_own_expert_counts_and_match_reference(tmp_path):
    _, cfg = make_tiny_prmoe(tmp_path, num_hidden_layers=6, moe_layers=[1, 3, 5], num_experts_per_layer=[2, 4, 8],
                             moe_top_k=2)
    model = build_model(load_transformer_config(tmp_path), 64)
    _random_params(model, 4)
    assert [type(layer.mlp).__name__ for layer in model.layers] == ["GatedMLP", "MoEBlock"] * 3
    assert [layer.mlp.experts.w13.shape[0] for layer in model.layers[1::2]] == [2, 4, 8]
    assert [layer.router.gate.weight.shape for layer in model.layers[1::2]] == [(n, 32) for n in (2, 4, 8)]
    x = torch.randn(9, 32, generator=torch.Generator().manual_seed(5))
    for layer in model.layers[1::2]:
        with torch.no_grad():
            out = layer.ffn_half(x, layer.router(x))
        gate_w, experts, residual = _block_params(layer.mlp, layer.router)
        ref = torch.stack([moe_token(x[t], gate_w, experts, 2, True, residual) for t in range(len(x))])
        assert torch.allclose(out, ref, atol=1e-5, rtol=0)


def test_prmoe_config_placement_and_errors(tmp_path):
    make_tiny_prmoe(tmp_path)
    cfg = load_transformer_config(tmp_path)
    del cfg.raw["moe_layers"]  # default: every other layer, 1, 3, ...
    cfg.raw.update(num_experts_per_layer=4, residual_moe=False)
    model = build_model(cfg, 64)
    assert [i for i, layer in enumerate(model.layers) if isinstance(layer.mlp, MoEBlock)] == [1, 3]
    assert model.layers[1].mlp.residual_mlp is None
    cfg.raw.update(num_experts_per_layer=[4, 8, 16])
    with pytest.raises(ValueError, match="3 entries for 2 MoE layers"):
        build_model(cfg, 64)
    cfg.raw.update(num_experts_per_layer=[4, 8], moe_layers=[1, 7])
    with pytest.raises(ValueError, match=r"moe_layers \[7\] outside"):
        build_model(cfg, 64)


@pytest.fixture
def tiny_prmoe(tmp_path):
    return tmp_path, *make_tiny_prmoe(tmp_path)


def test_prmoe_checkpoint_round_trips_through_the_engine(tiny_prmoe):
    model_dir, w, cfg = tiny_prmoe
    llm = LLM(str(model_dir), dtype="float32", block_size=16)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)  # batched
    assert_outputs_match_reference(outs, PROMPTS, NEW_TOKENS, lambda ids: reference_logits(w, cfg, ids))
    model = llm.engine.core.executor.runner.model
    assert [layer.mlp.experts.last_tokens_per_expert.shape[0] for layer in model.layers[1::2]] == [4, 8]


def test_prmoe_serves_through_afdserve_serve(tiny_prmoe, tmp_path):
    model_dir, w, cfg = tiny_prmoe
    with ServerProcess(model_dir, tmp_path / "server.log", "--num-kv-blocks", "64") as server:
        resp = httpx.post(server.url("/v1/completions"), timeout=60,
                          json=dict(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=5, temperature=0,
                                    ignore_eos=True, logprobs=1))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["usage"]["completion_tokens"] == 5
    assert len(body["choices"][0]["logprobs"]["tokens"]) == 5
    expected = reference_greedy(w, cfg, PROMPTS[0], 5)
    assert body["choices"][0]["logprobs"]["tokens"] == [f"<{t}>" for t in expected]


def test_prmoe_runs_in_bfloat16_within_rounding_of_the_reference(tiny_prmoe):
    """Every parameter bf16; the logits of a prefill and the decodes after it within bf16's rounding of the fp32
    reference (logits' std ~1.1; measured per-position errors: median 0.042, 90th percentile 0.059, largest 0.18,
    from a routing flip), with two positions allowed a flipped routing."""
    model_dir, w, cfg = tiny_prmoe
    llm = LLM(str(model_dir), dtype="bfloat16", block_size=16)
    model = llm.engine.core.executor.runner.model
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    oracle = lambda ids: SimpleNamespace(logits=reference_logits(w, cfg, ids[0].tolist())[None])  # noqa: E731
    assert_raw_logits_match(llm, oracle, list(range(3, 40)), atol=0.12, max_outliers=2)


def test_prmoe_through_afd_1a1f_equals_local(tiny_prmoe):
    """Pyramid expert counts and the residual mix live in the FFN worker; routing travels with ffn_input."""
    model_dir, w, cfg = tiny_prmoe
    greedy = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    llm = LLM(str(model_dir), dtype="float32", afd="1A1F", micro_batches=2, afd_transport="shm")
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy, use_tqdm=False)]
    finally:
        llm.engine.shutdown()
    assert got == [reference_greedy(w, cfg, p, NEW_TOKENS) for p in PROMPTS]
