"""Multi-head Latent Attention (MLA; DeepSeek-V2, arXiv:2405.04434, sec. 2.1), the attention of DeepSeek-V2/V3.

Keys and values are compressed into one latent per token, and only it is cached (with the shared RoPE key):

    q          = q_b(RMSNorm(q_a(x)))   or q_proj(x) without a query LoRA      [T, heads, nope + rope]
    q_nope, q_pe = q split
    c_kv, k_pe = kv_a_proj_with_mqa(x) split;  c_kv = RMSNorm(c_kv)          [T, kv_lora_rank], [T, rope]
    q_pe, k_pe = RoPE(q_pe), RoPE(k_pe)   (DeepSeek's interleaved pairs; YaRN scaled)
    W_UK, W_UV = kv_b_proj's rows per head: k_nope = c_kv W_UK^T, v = c_kv W_UV^T
    cache      <- [c_kv | k_pe]                                              kv_lora_rank + rope values a token

Decodes run in the absorbed form (the paper's "absorb W_UK into W_Q and W_UV into W_O"): the query is moved into the
latent space, q_lat = q_nope W_UK ([T, heads, kv_lora_rank]), so that q_nope . k_nope = q_lat . c_kv and every head
reads the cached entries as they are; the output, in the latent space, is multiplied by W_UV per head. Prefill
chunks expand the cached latents into per-head keys and values instead, cheaper for many queries
(kernels/attention/mla_paged.py; decodes in Triton under the Triton backend). Then o_proj. The softmax scale is
(nope + rope)^-0.5, times YaRN's mscale(factor, mscale_all_dim)^2 when the context is extended.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from afdserve.kernels.attention import AttentionMetadata
from afdserve.kernels.attention.mla_paged import mla_attention_backend
from afdserve.models.hf_config import TransformerConfig
from afdserve.models.layers.linear import Linear
from afdserve.models.layers.norm import RMSNorm
from afdserve.models.layers.rotary import RopeTables, apply_rotary, rope_type_of, yarn_mscale


# The latents' RMSNorms use DeepSeek's default epsilon, not the config's rms_norm_eps (as in DeepSeek's own code).
LATENT_NORM_EPS = 1e-6


@dataclass(frozen=True)
class MLAConfig:
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None  # None: a full-rank q_proj (DeepSeek-V2-Lite)
    rope_interleave: bool = True  # RoPE over pairs (x0, x1), (x2, x3), ... as DeepSeek's weights expect

    @property
    def latent_dim(self) -> int:
        """Values cached per token and layer."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def softmax_scale(self, rope_scaling: dict | None) -> float:
        scale = (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5
        if rope_type_of(rope_scaling) != "default" and rope_scaling.get("mscale_all_dim"):
            scale *= yarn_mscale(rope_scaling["factor"], rope_scaling["mscale_all_dim"]) ** 2
        return scale


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (x0, x2, ..., x1, x3, ...): interleaved RoPE pairs become the two halves that the
    neox-layout rotation turns together (the same rotation; q and k both moved, so q . k is unchanged)."""
    return x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)


class MLAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig, mla: MLAConfig, layer_index: int, backend_name: str = "torch"):
        """backend_name: the engine's attention backend, whose MLA decode this layer runs."""
        super().__init__()
        self.layer_index = layer_index
        self.mla = mla
        self.num_heads = cfg.num_heads
        qk_head_dim = mla.qk_nope_head_dim + mla.qk_rope_head_dim
        if mla.q_lora_rank is None:
            self.q_proj = Linear(cfg.hidden_size, self.num_heads * qk_head_dim, bias=False)
        else:
            self.q_a_proj = Linear(cfg.hidden_size, mla.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = Linear(mla.q_lora_rank, self.num_heads * qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(cfg.hidden_size, mla.latent_dim, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, LATENT_NORM_EPS)
        # Read per head as W_UK and W_UV, never as a linear layer: a plain nn.Linear, so that it is not prepacked.
        self.kv_b_proj = nn.Linear(mla.kv_lora_rank, self.num_heads * (mla.qk_nope_head_dim + mla.v_head_dim),
                                   bias=False)
        self.o_proj = Linear(self.num_heads * mla.v_head_dim, cfg.hidden_size, bias=cfg.attention_bias)
        self.scale = mla.softmax_scale(cfg.rope_scaling)
        self.attn = mla_attention_backend(backend_name)

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if self.mla.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return q.view(-1, self.num_heads, self.mla.qk_nope_head_dim + self.mla.qk_rope_head_dim)

    def _rope(self, x: torch.Tensor, rope: RopeTables) -> torch.Tensor:
        return apply_rotary(deinterleave(x) if self.mla.rope_interleave else x, rope)

    def forward(self, x: torch.Tensor, rope: RopeTables, meta: AttentionMetadata,
                kv_cache: torch.Tensor) -> torch.Tensor:
        mla = self.mla
        q_nope, q_pe = self._query(x).split([mla.qk_nope_head_dim, mla.qk_rope_head_dim], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([mla.kv_lora_rank, mla.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        q_pe, k_pe = self._rope(q_pe, rope), self._rope(k_pe.unsqueeze(1), rope).squeeze(1)
        w_uk, w_uv = self.kv_b_proj.weight.view(self.num_heads, -1, mla.kv_lora_rank).split(
            [mla.qk_nope_head_dim, mla.v_head_dim], dim=1)
        out = self.attn(q_nope, q_pe, torch.cat([c_kv, k_pe], dim=-1), kv_cache, meta, self.scale, w_uk, w_uv)
        return self.o_proj(out.reshape(-1, self.num_heads * mla.v_head_dim))
