"""`DeepseekV2ForCausalLM` and `DeepseekV3ForCausalLM` (arXiv:2405.04434, arXiv:2412.19437), read from their HF
checkpoints.

The network is the Llama-family decoder of models/llama.py (pre-norm RMSNorm, residual adds, the attention / FFN
halves that AFD splits) with DeepSeek's two parts:
    attention: MLA (models/layers/mla.py): a compressed latent KV cache of kv_lora_rank + qk_rope_head_dim values a
               token and layer (576 for both V2 and V3), RoPE over qk_rope_head_dim only (YaRN-scaled when
               `rope_scaling` says so), absorbed weights for decodes and the decompressed form for prefill chunks
    FFN:       layers i >= first_k_dense_replace with i % moe_layer_freq == 0: DeepSeekMoE (shared experts + routed
               experts; V2: softmax, greedy or group_limited_greedy; V3: sigmoid, noaux_tc with
               e_score_correction_bias, models/moe_config.deepseek_moe_config); the others a dense SwiGLU MLP
V3's multi-token-prediction layer (`model.layers.{num_hidden_layers}`) is not served: its tensors are skipped.

config.json fields read here (besides the Llama ones, models/hf_config.py, and the MoE ones, models/moe_config.py):
    kv_lora_rank, q_lora_rank (null: a full-rank q_proj, as DeepSeek-V2-Lite), qk_nope_head_dim, qk_rope_head_dim,
    v_head_dim, rope_interleave (V3; V2 always interleaves), rope_scaling {"type": "yarn", "factor", "mscale",
    "mscale_all_dim", "original_max_position_embeddings", "beta_fast", "beta_slow"}

Weight names (safetensors, `model.` prefix):
    layers.{i}.self_attn.q_a_proj / q_a_layernorm / q_b_proj (or q_proj), kv_a_proj_with_mqa, kv_a_layernorm,
    kv_b_proj [heads * (nope + v), kv_lora_rank], o_proj
    layers.{i}.mlp.gate.weight, .gate.e_score_correction_bias (V3), .experts.{e}.{gate,up,down}_proj,
    .shared_experts.{gate,up,down}_proj; dense layers: layers.{i}.mlp.{gate,up,down}_proj
"""
from __future__ import annotations

from dataclasses import replace

from afdserve.models.hf_config import TransformerConfig
from afdserve.models.layers.mla import MLAConfig
from afdserve.models.llama import LlamaVariant
from afdserve.models.moe_config import MoEConfig, deepseek_moe_config

_MLA_FIELDS = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def deepseek_v2_variant(cfg: TransformerConfig) -> LlamaVariant:
    raw = cfg.raw
    missing = [f for f in _MLA_FIELDS if not raw.get(f)]
    if missing:
        raise ValueError(f"a {cfg.architecture} config lacks MLA fields {', '.join(map(repr, missing))}")
    if raw["qk_rope_head_dim"] % 2:
        raise ValueError(f"RoPE needs an even qk_rope_head_dim, got {raw['qk_rope_head_dim']}")
    v3 = cfg.architecture == "DeepseekV3ForCausalLM"
    mla = MLAConfig(kv_lora_rank=raw["kv_lora_rank"], qk_nope_head_dim=raw["qk_nope_head_dim"],
                    qk_rope_head_dim=raw["qk_rope_head_dim"], v_head_dim=raw["v_head_dim"],
                    q_lora_rank=raw.get("q_lora_rank") or None,
                    rope_interleave=bool(raw.get("rope_interleave", True)) if v3 else True)
    return LlamaVariant(mla=mla)


def deepseek_v3_moe_config(cfg: TransformerConfig) -> MoEConfig | None:
    """V3's router is sigmoid-scored noaux_tc whatever the config omits (transformers saves neither field)."""
    raw = {"topk_method": "noaux_tc", "scoring_func": "sigmoid", **{k: v for k, v in cfg.raw.items() if v is not None}}
    return deepseek_moe_config(replace(cfg, raw=raw))
