"""Step-3's Multi-matrix Factorization Attention (MFA, arXiv:2507.19427): MQA whose query is low-rank.

    [q_lat | k | v] = x @ W_qkv          q_lat [T, share_q_dim], k and v [T, kv_heads * head_dim]
    q = RMSNorm(q_lat) @ W_q             [T, heads * head_dim]   (`inter_norm`, `wq`)
    q, k = RoPE(q), RoPE(k)              over the full head_dim; K is cached after RoPE
    out = attention(q, k, v) @ W_o       heads query kv_heads (Step-3: 64 heads of 256 on 1 KV head), scale hd^-0.5

The KV cache is an ordinary paged cache with kv_heads heads (one for Step-3), so any MQA/GQA backend serves it.
"""
from __future__ import annotations

import torch
from torch import nn

from afdserve.kernels.attention import AttentionBackend, AttentionMetadata
from afdserve.models.hf_config import TransformerConfig
from afdserve.models.layers.linear import Linear
from afdserve.models.layers.norm import RMSNorm
from afdserve.models.layers.rotary import RopeTables, apply_rotary


class MFAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig, share_q_dim: int, attention: AttentionBackend, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        self.qkv_sizes = [share_q_dim, kv_size, kv_size]  # rows of the fused projection: q_proj, k_proj, v_proj
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = Linear(cfg.hidden_size, sum(self.qkv_sizes), bias=False)
        self.inter_norm = RMSNorm(share_q_dim, cfg.rms_norm_eps)
        self.wq = Linear(share_q_dim, self.num_heads * self.head_dim, bias=False)
        self.o_proj = Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.attn = attention

    def forward(self, x: torch.Tensor, rope: RopeTables, meta: AttentionMetadata,
                kv_cache: torch.Tensor) -> torch.Tensor:
        q_lat, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        q = self.wq(self.inter_norm(q_lat)).view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        out = self.attn(q, k, v, kv_cache, meta, self.scale, self.layer_index)
        return self.o_proj(out.reshape(-1, self.num_heads * self.head_dim))
