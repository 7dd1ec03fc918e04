"""MoE routing and expert compute against plain references.

- The torch expert path (kernels/moe/torch_moe.py) equals the naive per-token loop (kernels/moe/reference.py),
  including tied router scores and experts that receive no tokens, and reports tokens per expert.
- Routers (models/layers/moe_router.py) equal a per-token reference written from the routers' math
  (DeepSeek-V2 arXiv:2405.04434, DeepSeek-V3 arXiv:2412.19437) and, where transformers has the gate, transformers' own router module
  (Mixtral, Qwen2-MoE, DeepSeek-V2 group-limited greedy, DeepSeek-V3 noaux_tc with correction bias).
"""
import math

import pytest
import torch

from afdserve.kernels.moe import fused_experts_torch, moe_reference, permute_by_expert
from afdserve.models.layers.moe_router import RouterConfig, Routing, select_experts

H, I = 32, 24


def _weights(num_experts: int, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * I, H, generator=g) * 0.2
    w2 = torch.randn(num_experts, H, I, generator=g) * 0.2
    return w13.to(dtype), w2.to(dtype)


# ---- expert compute ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_tokens,top_k", [(1, 1), (7, 2), (33, 3)])
def test_torch_path_matches_reference_with_idle_experts(num_tokens, top_k):
    num_experts = 8
    g = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(num_tokens, H, generator=g)
    # Only experts 1, 2, 4 and 6 are ever chosen: the others receive no tokens.
    logits = torch.full((num_tokens, num_experts), -30.0)
    logits[:, [1, 2, 4, 6]] = torch.randn(num_tokens, 4, generator=g)
    routing = select_experts(logits, RouterConfig(num_experts, top_k, renormalize=True))
    w13, w2 = _weights(num_experts)
    out, counts = fused_experts_torch(x, w13, w2, *routing)
    ref = moe_reference(x, w13, w2, *routing)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert counts.tolist() == torch.bincount(routing.topk_ids.flatten(), minlength=num_experts).tolist()
    assert counts[[0, 3, 5, 7]].sum() == 0 and counts.sum() == num_tokens * top_k


def test_torch_path_with_tied_scores_matches_reference():
    """All-equal and pairwise-equal router scores: the chosen experts are the lowest ids, and both paths agree."""
    num_experts, top_k = 6, 2
    x = torch.randn(5, H, generator=torch.Generator().manual_seed(1))
    logits = torch.tensor([[0.0] * 6, [1.0, 2.0, 2.0, 0.0, 2.0, 1.0], [3.0, 1.0, 3.0, 3.0, 1.0, 0.0],
                           [0.0, 0.0, 0.0, 0.0, 5.0, 5.0], [0.5, 0.5, 0.5, 0.5, 0.5, 0.5]])
    routing = select_experts(logits, RouterConfig(num_experts, top_k))
    assert routing.topk_ids.tolist() == [[0, 1], [1, 2], [0, 2], [4, 5], [0, 1]]
    w13, w2 = _weights(num_experts, seed=2)
    out, counts = fused_experts_torch(x, w13, w2, *routing)
    torch.testing.assert_close(out, moe_reference(x, w13, w2, *routing), atol=1e-5, rtol=1e-5)
    assert counts.tolist() == [3, 3, 2, 0, 1, 1]


def test_torch_path_bf16_and_empty_batch():
    num_experts = 4
    x = torch.randn(9, H, generator=torch.Generator().manual_seed(3))
    routing = select_experts(torch.randn(9, num_experts), RouterConfig(num_experts, 2))
    w13, w2 = _weights(num_experts, dtype=torch.bfloat16)
    out, _ = fused_experts_torch(x.bfloat16(), w13, w2, *routing)
    assert out.dtype == torch.bfloat16
    ref = moe_reference(x.bfloat16(), w13, w2, *routing)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    empty, counts = fused_experts_torch(x[:0], w13, w2, routing.topk_ids[:0], routing.topk_weights[:0])
    assert empty.shape == (0, H) and counts.tolist() == [0] * num_experts


def test_permutation_groups_rows_by_expert_in_token_order():
    topk_ids = torch.tensor([[2, 0], [0, 3], [2, 3], [0, 2]])
    perm = permute_by_expert(topk_ids, num_experts=5)
    assert perm.tokens_per_expert.tolist() == [3, 0, 3, 2, 0]
    assert perm.expert_offsets.tolist() == [0, 3, 3, 6, 8, 8]
    assert topk_ids.flatten()[perm.order].tolist() == [0, 0, 0, 2, 2, 2, 3, 3]
    assert perm.token_idx.tolist() == [0, 1, 3, 0, 2, 3, 1, 2]


# ---- routers: the math, one token at a time --------------------------------------------------------------


def reference_route(logits: torch.Tensor, cfg: RouterConfig, bias: torch.Tensor | None = None) -> Routing:
    ids, weights = [], []
    for row in logits.double().tolist():
        if cfg.scoring == "softmax":
            z = sum(math.exp(v - max(row)) for v in row)
            scores = [math.exp(v - max(row)) / z for v in row]
        else:
            scores = [1 / (1 + math.exp(-v)) for v in row]
        choice = [s + b for s, b in zip(scores, bias.tolist())] if cfg.topk_method == "noaux_tc" else scores
        allowed = range(cfg.num_experts)
        if cfg.topk_method != "greedy":
            size = cfg.num_experts // cfg.n_group
            groups = [choice[g * size:(g + 1) * size] for g in range(cfg.n_group)]
            if cfg.topk_method == "noaux_tc":
                group_score = [sum(sorted(grp, reverse=True)[:2]) for grp in groups]
            else:
                group_score = [max(grp) for grp in groups]
            kept = sorted(range(cfg.n_group), key=lambda g: (-group_score[g], g))[:cfg.topk_group]
            allowed = [e for e in range(cfg.num_experts) if e // size in kept]
        chosen = sorted(allowed, key=lambda e: (-choice[e], e))[:cfg.top_k]
        w = [scores[e] for e in chosen]
        if cfg.renormalize:
            w = [v / sum(w) for v in w]
        ids.append(chosen)
        weights.append([v * cfg.routed_scaling_factor for v in w])
    return Routing(torch.tensor(ids), torch.tensor(weights, dtype=torch.float32))


ROUTERS = {
    "softmax": RouterConfig(16, 4),
    "softmax-renormalized": RouterConfig(16, 4, renormalize=True),
    "v2-group-limited": RouterConfig(16, 3, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                     routed_scaling_factor=16.0),
    "v3-noaux_tc": RouterConfig(16, 4, scoring="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2,
                                renormalize=True, routed_scaling_factor=2.5),
    "v3-noaux_tc-one-group": RouterConfig(8, 2, scoring="sigmoid", topk_method="noaux_tc", renormalize=False),
}


def _assert_same_routing(got: Routing, want: Routing, atol: float = 1e-6):
    """Same expert per slot and same weights; slot order normalized by sorting the ids."""
    g_ids, g_order = got.topk_ids.sort(dim=-1)
    w_ids, w_order = want.topk_ids.sort(dim=-1)
    assert torch.equal(g_ids, w_ids)
    torch.testing.assert_close(got.topk_weights.gather(-1, g_order), want.topk_weights.float().gather(-1, w_order),
                               atol=atol, rtol=1e-5)


@pytest.mark.parametrize("name", ROUTERS)
def test_router_matches_spec_reference(name):
    cfg = ROUTERS[name]
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(64, cfg.num_experts, generator=g)
    bias = torch.randn(cfg.num_experts, generator=g) * 0.3 if cfg.uses_correction_bias else None
    got = select_experts(logits, cfg, bias)
    assert got.topk_ids.dtype == torch.int64 and got.topk_weights.dtype == torch.float32
    assert got.topk_ids.shape == got.topk_weights.shape == (64, cfg.top_k)
    want = reference_route(logits, cfg, bias)
    assert torch.equal(got.topk_ids, want.topk_ids)  # same order too: descending choice score
    torch.testing.assert_close(got.topk_weights, want.topk_weights, atol=1e-6, rtol=1e-5)
    if cfg.grouped:  # every token's experts lie in at most topk_group groups
        groups = got.topk_ids // cfg.group_size
        assert all(len(set(row)) <= cfg.topk_group for row in groups.tolist())


@pytest.mark.parametrize("name", ROUTERS)
def test_router_ties_go_to_the_lowest_expert_and_group(name):
    cfg = ROUTERS[name]
    logits = torch.zeros(3, cfg.num_experts)  # everything tied
    logits[1, -1] = 1.0  # one clear winner, then ties
    logits[2, 0] = -1.0  # one clear loser
    bias = torch.zeros(cfg.num_experts) if cfg.uses_correction_bias else None
    got = select_experts(logits, cfg, bias)
    assert torch.equal(got.topk_ids, reference_route(logits, cfg, bias).topk_ids)
    assert got.topk_ids[0].tolist() == list(range(cfg.top_k))
    assert got.topk_ids[1, 0] == cfg.num_experts - 1


def test_correction_bias_steers_selection_not_weights():
    cfg = ROUTERS["v3-noaux_tc"]
    logits = torch.randn(32, 16, generator=torch.Generator().manual_seed(5))
    bias = torch.zeros(16)
    bias[[3, 9]] = 10.0  # experts 3 and 9 (groups 0 and 2) always chosen
    got = select_experts(logits, cfg, bias)
    assert all({3, 9} <= set(row) for row in got.topk_ids.tolist())
    scores = logits.sigmoid().gather(-1, got.topk_ids)
    torch.testing.assert_close(got.topk_weights, 2.5 * scores / scores.sum(-1, keepdim=True))


def test_router_config_rejects_impossible_settings():
    with pytest.raises(ValueError, match="top_k"):
        RouterConfig(4, 5)
    with pytest.raises(ValueError, match="n_group"):
        RouterConfig(10, 2, topk_method="group_limited_greedy", n_group=4)
    with pytest.raises(ValueError, match="kept groups"):
        RouterConfig(16, 5, topk_method="group_limited_greedy", n_group=4, topk_group=1)
    with pytest.raises(ValueError, match="topk_method"):
        RouterConfig(16, 2, topk_method="random")
    with pytest.raises(ValueError, match="correction_bias"):
        select_experts(torch.zeros(1, 16), ROUTERS["v3-noaux_tc"])


# ---- routers against transformers' gate modules ----------------------------------------------------------------


def _hf_router(kind: str, num_experts: int, top_k: int, **fields):
    import transformers
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter
    common = dict(hidden_size=H, num_experts_per_tok=top_k)
    if kind == "mixtral":
        return MixtralTopKRouter(transformers.MixtralConfig(num_local_experts=num_experts, **common))
    if kind == "qwen2_moe":
        return Qwen2MoeTopKRouter(transformers.Qwen2MoeConfig(num_experts=num_experts, **common, **fields))
    if kind == "deepseek_v2":
        return DeepseekV2TopkRouter(transformers.DeepseekV2Config(n_routed_experts=num_experts, **common, **fields))
    return DeepseekV3TopkRouter(transformers.DeepseekV3Config(n_routed_experts=num_experts, **common, **fields))


HF_ROUTERS = {
    "mixtral": (dict(kind="mixtral"), RouterConfig(8, 2, renormalize=True)),
    "qwen2_moe": (dict(kind="qwen2_moe", norm_topk_prob=False), RouterConfig(8, 2)),
    "qwen3_moe-norm": (dict(kind="qwen2_moe", norm_topk_prob=True), RouterConfig(8, 2, renormalize=True)),
    "deepseek_v2-group-limited": (
        dict(kind="deepseek_v2", topk_method="group_limited_greedy", n_group=4, topk_group=2,
             routed_scaling_factor=16.0),
        RouterConfig(16, 3, topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=16.0)),
    "deepseek_v3-noaux_tc": (
        dict(kind="deepseek_v3", n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5),
        RouterConfig(16, 4, scoring="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2, renormalize=True,
                     routed_scaling_factor=2.5)),
}


@pytest.mark.parametrize("name", HF_ROUTERS)
def test_router_matches_transformers_gate(name):
    fields, cfg = HF_ROUTERS[name]
    fields = dict(fields)
    hf = _hf_router(fields.pop("kind"), cfg.num_experts, cfg.top_k, **fields)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(cfg.num_experts, H, generator=g) * 0.3)
        bias = None
        if cfg.uses_correction_bias:
            bias = torch.randn(cfg.num_experts, generator=g) * 0.3
            hf.e_score_correction_bias.copy_(bias)
        x = torch.randn(48, H, generator=g)
        _, hf_weights, hf_ids = hf(x)
    got = select_experts(x @ hf.weight.T, cfg, bias)
    _assert_same_routing(got, Routing(hf_ids, hf_weights))
