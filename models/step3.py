"""`Step3TextForCausalLM`: Step-3's text decoder (arXiv:2507.19427), read from an HF-style checkpoint.

The network is the Llama-family decoder of models/llama.py (pre-norm RMSNorm, RoPE, residual adds, the attention /
FFN halves that AFD splits) with two Step-3 parts:
    attention: MFA (models/layers/mfa.py): q_lat = q_proj(x) [share_q_dim] -> inter_norm -> wq -> heads x head_dim,
               one K and one V head of head_dim (MQA), RoPE over the whole head, K cached after RoPE
    FFN:       layers in `moe_layers_enum`: a shared SwiGLU expert + routed SwiGLU experts (softmax top-k router,
               renormalized iff `norm_expert_weight`); the other layers: a dense SwiGLU MLP of `intermediate_size`

config.json (Step-3's own field names; the Llama ones are read by models/hf_config.py):

    {
      "architectures": ["Step3TextForCausalLM"], "model_type": "step3_text",
      "vocab_size": 128815, "hidden_size": 7168, "num_hidden_layers": 61, "intermediate_size": 18432,
      "num_attention_heads": 64, "num_attention_groups": 1,   # KV heads: must be 1
      "head_dim": 256, "share_q_dim": 2048,
      "moe_layers_enum": "4,5,...,59",                         # comma-separated string (or a list) of MoE layers
      "moe_num_experts": 48, "moe_top_k": 3, "moe_intermediate_size": 5120, "share_expert_dim": 5120,
      "norm_expert_weight": false, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embedding": 65536
    }

`moe_layers_enum` is required: vLLM's default without it is layers 1.. (one dense layer) and SGLang's is 4..59, so a
checkpoint that omits it is ambiguous.

Weight names (safetensors; `model.` prefix optional):
    model.embed_tokens.weight, model.norm.weight, lm_head.weight
    model.layers.{i}.input_layernorm.weight / post_attention_layernorm.weight
    model.layers.{i}.self_attn.q_proj.weight [share_q_dim, H] / k_proj, v_proj [head_dim, H]   fused into qkv_proj
    model.layers.{i}.self_attn.inter_norm.weight [share_q_dim], wq.weight [heads*head_dim, share_q_dim],
                                o_proj.weight [H, heads*head_dim]
    dense layer i:  model.layers.{i}.mlp.{gate,up,down}_proj.weight
    MoE layer i:    model.layers.{i}.moe.gate.weight [E, H]                              router
                    model.layers.{i}.moe.{gate,up}_proj.weight [E, I, H], down_proj [E, H, I]   all experts stacked
                    model.layers.{i}.share_expert.{gate,up,down}_proj.weight              the shared expert
Ours: `moe.gate` -> `router.gate`, `moe.*` -> `mlp.experts.*` (one stacked parameter per projection pair),
`share_expert.*` -> `mlp.shared_expert.*` (models/layers/moe.py's MoEBlock).
"""
from __future__ import annotations

from afdserve.models.hf_config import TransformerConfig
from afdserve.models.layers.moe_router import RouterConfig
from afdserve.models.llama import LlamaVariant
from afdserve.models.moe_config import MoEConfig, check_silu

_MOE_FIELDS = ("moe_layers_enum", "moe_num_experts", "moe_top_k", "moe_intermediate_size", "share_expert_dim")


def step3_variant(cfg: TransformerConfig) -> LlamaVariant:
    raw = cfg.raw
    share_q_dim = raw.get("share_q_dim")
    if not isinstance(share_q_dim, int) or share_q_dim <= 0:
        raise ValueError(f"a Step-3 config needs 'share_q_dim' (the low-rank query width), got {share_q_dim!r}")
    if cfg.num_kv_heads != 1:  # hf_config reads num_attention_groups; without it, KV heads default to the q heads
        raise ValueError(f"Step-3 MFA has one KV head: the config must set 'num_attention_groups' to 1 "
                         f"(got {cfg.num_kv_heads} KV heads)")
    if cfg.head_dim % 2:
        raise ValueError(f"RoPE over the whole head needs an even head_dim, got {cfg.head_dim}")
    return LlamaVariant(share_q_dim=share_q_dim)


def step3_moe_config(cfg: TransformerConfig) -> MoEConfig:
    raw = cfg.raw
    missing = [f for f in _MOE_FIELDS if raw.get(f) is None]
    if missing:
        raise ValueError(f"a Step-3 config lacks {', '.join(map(repr, missing))}")
    check_silu(raw)
    router = RouterConfig(num_experts=raw["moe_num_experts"], top_k=raw["moe_top_k"],
                          renormalize=bool(raw.get("norm_expert_weight", False)))
    return MoEConfig(router=router, intermediate_size=raw["moe_intermediate_size"],
                     moe_layers=frozenset(_moe_layers(raw["moe_layers_enum"], cfg.num_layers)),
                     shared_intermediate_size=raw["share_expert_dim"],
                     hf_renames=(("share_expert.", "mlp.shared_expert."), ("moe.", "mlp.")),
                     hf_experts_stacked=True)


def _moe_layers(enum, num_layers: int) -> list[int]:
    """`moe_layers_enum`: "4,5,6" as in Step-3's config.json, or a list of ints."""
    try:
        layers = [int(i) for i in (enum.split(",") if isinstance(enum, str) else enum)]
    except (TypeError, ValueError):
        raise ValueError(f"'moe_layers_enum' must list layer indices like \"4,5,6\", got {enum!r}") from None
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"moe_layers_enum {bad} outside the model's {num_layers} layers")
    return layers
