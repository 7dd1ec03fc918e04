"""Weights a token multiplies through, per family, from the config alone: what `usage.afdserve_cost` charges.

A token's linear FLOPs are 2 x the matmul weights it passes (one multiply and one add per weight). Per decoder layer:
    attention   Q, K, V and O projections (Step-3's MFA: the low-rank query q_proj and wq instead of Q; MLA: the query
                projections, kv_a_proj_with_mqa, kv_b_proj (= W_UK and W_UV, which the absorbed form applies per
                token) and o_proj)
    FFN         dense: gate, up and down (3 H I);  MoE: the router (H E), top_k routed experts (3 H I_e each), the
                shared expert or residual MLP (3 H I_s) and their gates (H, or 2 H for the residual mix);
                Read-ME: no router per layer but one pre-gating router per token (its MLP and head)
and once per position whose logits are computed, the LM head (V H). Embedding lookups multiply nothing. Norms,
RoPE and the activation are element-wise and left out, as the cost models of Step-3 (arXiv 2507.19427) and Kinetics
(arXiv 2506.05333) leave them out. Computed from the config so that the engine's process knows it without the
weights (under AFD they live in the workers)."""
from __future__ import annotations

from dataclasses import dataclass

from afdserve.models.hf_config import TransformerConfig
from afdserve.models.layers.mla import MLAConfig
from afdserve.models.readme import router_sizes
from afdserve.models.registry import architecture_of


@dataclass(frozen=True)
class ActiveParams:
    """Matmul weights one token passes, summed over the decoder layers, and the LM head's."""
    attention: int  # Q/K/V/O projections
    ffn: int  # the FFN half: dense MLP, or router + activated experts + shared expert
    lm_head: int  # per position whose logits are computed

    @property
    def per_token(self) -> int:
        """Weights every token passes (the LM head apart)."""
        return self.attention + self.ffn


def active_params(cfg: TransformerConfig) -> ActiveParams:
    variant, moe = architecture_of(cfg)
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    if variant.mla is not None:
        attention = cfg.num_layers * _mla_weights(h, cfg.num_heads, variant.mla)
    else:
        if variant.share_q_dim:  # MFA: x -> q_proj [share_q_dim] -> wq [heads x head_dim]
            q_weights = h * variant.share_q_dim + variant.share_q_dim * q
        else:
            q_weights = h * q
        attention = cfg.num_layers * (q_weights + 2 * h * kv + q * h)
    ffn = 0
    for layer in range(cfg.num_layers):
        layer_moe = moe.for_layer(layer) if moe is not None else None
        if layer_moe is None:
            ffn += 3 * h * cfg.intermediate_size
            continue
        router = 0 if layer_moe.pre_gated else h * layer_moe.num_experts
        ffn += router + layer_moe.router.top_k * 3 * h * layer_moe.intermediate_size
        if layer_moe.shared_intermediate_size:
            ffn += 3 * h * layer_moe.shared_intermediate_size + (h if layer_moe.shared_expert_gate else 0)
        if layer_moe.residual_intermediate_size:
            ffn += 3 * h * layer_moe.residual_intermediate_size + 2 * h
    if moe is not None and moe.pre_gated:  # Read-ME: one token-id router for all layers (its MLP and head)
        router_hidden, router_inter = router_sizes(cfg)
        ffn += 2 * router_hidden * router_inter + router_hidden * moe.num_experts
    return ActiveParams(attention, ffn, cfg.vocab_size * h)


def _mla_weights(h: int, heads: int, mla: MLAConfig) -> int:
    qk = mla.qk_nope_head_dim + mla.qk_rope_head_dim
    q_weights = h * heads * qk if mla.q_lora_rank is None else mla.q_lora_rank * (h + heads * qk)
    return (q_weights + h * mla.latent_dim + mla.kv_lora_rank * heads * (mla.qk_nope_head_dim + mla.v_head_dim)
            + heads * mla.v_head_dim * h)


def attention_flops_per_key(cfg: TransformerConfig) -> int:
    """FLOPs of one query position against one key, over all layers: a score and a weighted value per query head
    (2 d + 2 d); for MLA, the absorbed form's, which scores the whole cached entry and weighs its latent: what
    decodes run (prefill chunks run the decompressed form, 2 (nope + rope) + 2 v a key plus expanding the latents,
    which this rate does not price separately)."""
    variant, _ = architecture_of(cfg)
    if variant.mla is not None:
        per_head = 2 * variant.mla.latent_dim + 2 * variant.mla.kv_lora_rank
    else:
        per_head = 4 * cfg.head_dim
    return per_head * cfg.num_heads * cfg.num_layers
