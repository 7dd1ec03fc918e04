"""`PRMoEForCausalLM`: our own small checkpoint format for DeepSpeed-MoE style models, Pyramid-Residual MoE
(DeepSpeed-MoE, arXiv:2201.05596). The network is a Llama decoder (pre-norm RMSNorm, GQA with RoPE, SwiGLU) in which
chosen layers replace the dense MLP with an MoE block:

    pyramid:   each MoE layer has its own expert count (DeepSpeed's `--num-experts 64 64 ... 128 128`)
    residual:  y = moe_out * coef[:, 0] + mlp_out * coef[:, 1],  coef = softmax(coefficient(x)) over 2,
               moe_out = the routed experts (top-1 by default), mlp_out = a dense MLP the size of one expert

The model is built by models/llama.py from the MoEConfig read here; routing runs in the layer's attention half and
the residual coefficient in its FFN half (models/layers/moe.py). Experts and the residual MLP are SwiGLU, as in the
Llama family (DeepSpeed's Megatron GPT models use GeLU MLPs with biases: convert those weights elsewhere).

config.json (the Llama fields are read as for LlamaForCausalLM; the PRMoE fields are ours):

    {
      "architectures": ["PRMoEForCausalLM"], "model_type": "prmoe",
      "vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
      "num_key_value_heads": 2, "intermediate_size": 128,      # dense (non-MoE) layers' MLP width
      "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048, "tie_word_embeddings": false,
      "hidden_act": "silu",                                    # the only activation supported
      "moe_layers": [1, 3],                # MoE layer indices; absent: (i + 1) % moe_layer_freq == 0
      "moe_layer_freq": 2,                 # used only without moe_layers (default 2: every other layer, 1, 3, ...)
      "num_experts_per_layer": [4, 8],     # one count per MoE layer, in layer order (pyramid); or one int for all
      "expert_intermediate_size": 32,      # SwiGLU width of one expert, and of the residual MLP
      "moe_top_k": 1,                      # experts per token (DeepSpeed PR-MoE: 1)
      "norm_topk_prob": false,             # renormalize the k weights; absent: top_k > 1 (DeepSpeed's top-1 gate
                                           # keeps the softmax probability, its top-2 gate renormalizes)
      "residual_moe": true                 # Residual-MoE (default false: plain routed experts)
    }

Routing: softmax over the layer's experts in fp32, top-k, ties to the lowest expert id (models/layers/moe_router.py).

Weight names (safetensors, HF style; `model.` prefix optional):
    model.embed_tokens.weight                                   [V, H]
    model.layers.{i}.input_layernorm.weight / post_attention_layernorm.weight          [H]
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
    dense layer i:   model.layers.{i}.mlp.{gate,up,down}_proj.weight
    MoE layer i:     model.layers.{i}.mlp.gate.weight                                   [E_i, H]  router
                     model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight         one SwiGLU expert
                     model.layers.{i}.mlp.residual_mlp.{gate,up,down}_proj.weight        residual_moe only
                     model.layers.{i}.mlp.coefficient.weight [2, H], .bias [2]           residual_moe only
    model.norm.weight                                                                  [H]
    lm_head.weight   [V, H]  (absent with tie_word_embeddings)
"""
from __future__ import annotations

from afdserve.models.hf_config import TransformerConfig
from afdserve.models.layers.moe_router import RouterConfig
from afdserve.models.moe_config import MoEConfig


def prmoe_moe_config(cfg: TransformerConfig) -> MoEConfig:
    raw = cfg.raw
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported PRMoE activation {raw['hidden_act']!r}; supported: 'silu'")
    layers = _moe_layers(raw, cfg.num_layers)
    counts = _expert_counts(raw, layers)
    top_k = raw.get("moe_top_k", 1)
    renormalize = raw.get("norm_topk_prob")
    renormalize = top_k > 1 if renormalize is None else bool(renormalize)
    inter = raw["expert_intermediate_size"]
    router = RouterConfig(num_experts=counts[0], top_k=top_k, renormalize=renormalize)
    return MoEConfig(router=router, intermediate_size=inter, moe_layers=frozenset(layers),
                     residual_intermediate_size=inter if raw.get("residual_moe", False) else 0,
                     layer_num_experts=tuple((i, n) for i, n in zip(layers, counts) if n != counts[0]))


def _moe_layers(raw: dict, num_layers: int) -> list[int]:
    if raw.get("moe_layers") is not None:
        layers = sorted(set(raw["moe_layers"]))
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"moe_layers {bad} outside the model's {num_layers} layers")
    else:
        freq = raw.get("moe_layer_freq", 2)
        layers = [i for i in range(num_layers) if (i + 1) % freq == 0]
    if not layers:
        raise ValueError("a PRMoE model needs at least one MoE layer")
    return layers


def _expert_counts(raw: dict, layers: list[int]) -> list[int]:
    counts = raw.get("num_experts_per_layer")
    if counts is None:
        raise ValueError("a PRMoE config needs 'num_experts_per_layer' (a list, one per MoE layer, or an int)")
    if isinstance(counts, int):
        return [counts] * len(layers)
    if len(counts) != len(layers):
        raise ValueError(f"num_experts_per_layer has {len(counts)} entries for {len(layers)} MoE layers {layers}")
    return list(counts)
