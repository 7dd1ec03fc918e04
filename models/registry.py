"""Architecture name (config.json's `architectures[0]`) -> how to build the model."""
from __future__ import annotations

from typing import Callable

from torch import nn

from afdserve.kernels.attention import AttentionBackend
from afdserve.models.hf_config import TransformerConfig
from afdserve.models.llama import LlamaForCausalLM, LlamaVariant
from afdserve.models.moe_config import deepseek_moe_config, mixtral_moe_config, qwen_moe_config
from afdserve.models.prmoe import prmoe_moe_config
from afdserve.models.step3 import step3_moe_config, step3_variant

# (config, max positions, attention backend or None for the torch reference) -> model
ModelFactory = Callable[[TransformerConfig, int, AttentionBackend | None], nn.Module]

_REGISTRY: dict[str, ModelFactory] = {
    "LlamaForCausalLM": lambda cfg, n, a: LlamaForCausalLM(cfg, LlamaVariant(), n, attention=a),
    "MistralForCausalLM": lambda cfg, n, a: LlamaForCausalLM(cfg, LlamaVariant(), n, attention=a),
    "Qwen2ForCausalLM": lambda cfg, n, a: LlamaForCausalLM(cfg, LlamaVariant(qkv_bias=True), n, attention=a),
    "Qwen3ForCausalLM": lambda cfg, n, a: LlamaForCausalLM(cfg, LlamaVariant(qk_norm=True), n, attention=a),
    # MoE: Llama-family attention, MoE FFN (models/moe_config.py reads each family's fields).
    "MixtralForCausalLM": lambda cfg, n, a: LlamaForCausalLM(cfg, LlamaVariant(), n, mixtral_moe_config(cfg), a),
    "Qwen2MoeForCausalLM": lambda cfg, n, a: LlamaForCausalLM(
        cfg, LlamaVariant(qkv_bias=cfg.raw.get("qkv_bias", True)), n, qwen_moe_config(cfg), a),
    "Qwen3MoeForCausalLM": lambda cfg, n, a: LlamaForCausalLM(cfg, LlamaVariant(qk_norm=True), n,
                                                              qwen_moe_config(cfg), a),
    # DeepSeekMoE (deepseek-moe-16b): MHA + DeepSeekMoE FFN; its config may carry DeepSeek-V2/V3 gating fields.
    "DeepseekForCausalLM": lambda cfg, n, a: LlamaForCausalLM(cfg, LlamaVariant(), n, deepseek_moe_config(cfg), a),
    # Our DeepSpeed-MoE style format: pyramid (per-layer expert counts) and residual MoE; see models/prmoe.py.
    "PRMoEForCausalLM": lambda cfg, n, a: LlamaForCausalLM(cfg, LlamaVariant(), n, prmoe_moe_config(cfg), a),
    # Step-3: MFA attention (low-rank query, one KV head) + shared-expert MoE; see models/step3.py.
    "Step3TextForCausalLM": lambda cfg, n, a: LlamaForCausalLM(cfg, step3_variant(cfg), n, step3_moe_config(cfg), a),
}


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def build_model(cfg: TransformerConfig, max_positions: int, attention: AttentionBackend | None = None) -> nn.Module:
    try:
        factory = _REGISTRY[cfg.architecture]
    except KeyError:
        raise ValueError(f"unsupported architecture {cfg.architecture!r}; supported: "
                         f"{', '.join(supported_architectures())}") from None
    return factory(cfg, max_positions, attention)
