"""Architecture name (config.json's `architectures[0]`) -> how to build the model.

Every supported architecture is the Llama-family decoder of models/llama.py; what differs is its variant (biases,
QK-norm, Step-3's MFA query, DeepSeek's MLA) and its MoE FFN, each read from the config by a function per family."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from afdserve.kernels.attention import AttentionBackend
from afdserve.models.hf_config import TransformerConfig
from afdserve.models.deepseek_v2 import deepseek_v2_variant, deepseek_v3_moe_config
from afdserve.models.llama import LlamaForCausalLM, LlamaVariant
from afdserve.models.moe_config import MoEConfig, deepseek_moe_config, mixtral_moe_config, qwen_moe_config
from afdserve.models.prmoe import prmoe_moe_config
from afdserve.models.readme import READ_ME_ARCHITECTURE, readme_moe_config
from afdserve.models.step3 import step3_moe_config, step3_variant


def _dense(cfg: TransformerConfig) -> None:
    return None


@dataclass(frozen=True)
class Architecture:
    variant: Callable[[TransformerConfig], LlamaVariant]
    moe: Callable[[TransformerConfig], MoEConfig | None] = _dense


_ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture(lambda cfg: LlamaVariant()),
    "MistralForCausalLM": Architecture(lambda cfg: LlamaVariant()),
    "Qwen2ForCausalLM": Architecture(lambda cfg: LlamaVariant(qkv_bias=True)),
    "Qwen3ForCausalLM": Architecture(lambda cfg: LlamaVariant(qk_norm=True)),
    # MoE: Llama-family attention, MoE FFN (models/moe_config.py reads each family's fields).
    "MixtralForCausalLM": Architecture(lambda cfg: LlamaVariant(), mixtral_moe_config),
    "Qwen2MoeForCausalLM": Architecture(lambda cfg: LlamaVariant(qkv_bias=cfg.raw.get("qkv_bias", True)),
                                        qwen_moe_config),
    "Qwen3MoeForCausalLM": Architecture(lambda cfg: LlamaVariant(qk_norm=True), qwen_moe_config),
    # DeepSeekMoE (deepseek-moe-16b): MHA + DeepSeekMoE FFN; its config may carry DeepSeek-V2/V3 gating fields.
    "DeepseekForCausalLM": Architecture(lambda cfg: LlamaVariant(), deepseek_moe_config),
    # Our DeepSpeed-MoE style format: pyramid (per-layer expert counts) and residual MoE; see models/prmoe.py.
    "PRMoEForCausalLM": Architecture(lambda cfg: LlamaVariant(), prmoe_moe_config),
    # Read-ME: a dense Llama refactored into shared channels + experts, one token-id router; see models/readme.py.
    READ_ME_ARCHITECTURE: Architecture(lambda cfg: LlamaVariant(), readme_moe_config),
    # Step-3: MFA attention (low-rank query, one KV head) + shared-expert MoE; see models/step3.py.
    "Step3TextForCausalLM": Architecture(step3_variant, step3_moe_config),
    # DeepSeek-V2/V3: MLA attention (a latent KV cache) + DeepSeekMoE; see models/deepseek_v2.py.
    "DeepseekV2ForCausalLM": Architecture(deepseek_v2_variant, deepseek_moe_config),
    "DeepseekV3ForCausalLM": Architecture(deepseek_v2_variant, deepseek_v3_moe_config),
}


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def architecture_of(cfg: TransformerConfig) -> tuple[LlamaVariant, MoEConfig | None]:
    """The decoder variant and MoE config (None: dense) that `cfg` builds."""
    try:
        arch = _ARCHITECTURES[cfg.architecture]
    except KeyError:
        raise ValueError(f"unsupported architecture {cfg.architecture!r}; supported: "
                         f"{', '.join(supported_architectures())}") from None
    return arch.variant(cfg), arch.moe(cfg)


def build_model(cfg: TransformerConfig, max_positions: int, attention: AttentionBackend | None = None) -> nn.Module:
    variant, moe = architecture_of(cfg)
    return LlamaForCausalLM(cfg, variant, max_positions, moe, attention)
