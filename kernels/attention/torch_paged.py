"""Paged attention in plain torch: the CPU backend and the reference for the Triton kernels.

KV cache per layer: [num_blocks, 2, block_size, num_kv_heads, head_dim] (index 0 = K, 1 = V).
GQA: queries are viewed as [kv_heads, group, ...] so each K/V head is used by its group without being repeated.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.attention.metadata import AttentionMetadata


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Stores the step's new K/V ([T, kv_heads, head_dim]) into their slots."""
    block_size = kv_cache.shape[2]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    kv_cache[blocks, 0, offsets] = k.to(kv_cache.dtype)
    kv_cache[blocks, 1, offsets] = v.to(kv_cache.dtype)


def gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the blocks in `block_table` ([..., n]) as [..., n * block_size, kv_heads, head_dim]."""
    kv = kv_cache[block_table]  # [..., n, 2, bs, kvh, hd]
    lead = block_table.shape[:-1]
    k = kv.select(-4, 0).reshape(*lead, -1, *kv.shape[-2:])
    v = kv.select(-4, 1).reshape(*lead, -1, *kv.shape[-2:])
    return k, v


def decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                     max_seq_len: int, scale: float) -> torch.Tensor:
    """One query token per sequence. q: [B, heads, hd] -> [B, heads, hd]."""
    num_seqs, num_heads, head_dim = q.shape
    block_size = kv_cache.shape[2]
    num_blocks = -(-max_seq_len // block_size)
    k, v = gather_kv(kv_cache, block_tables[:, :num_blocks])  # [B, L, kvh, hd]
    kv_heads = k.shape[2]
    qg = q.view(num_seqs, kv_heads, num_heads // kv_heads, head_dim)
    scores = torch.einsum("bkgd,blkd->bkgl", qg, k.to(q.dtype)).float() * scale
    pad = torch.arange(k.shape[1]) >= seq_lens[:, None]  # [B, L]
    scores.masked_fill_(pad[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1).to(q.dtype)
    out = torch.einsum("bkgl,blkd->bkgd", probs, v.to(q.dtype))
    return out.reshape(num_seqs, num_heads, head_dim)


def prefill_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int,
                      scale: float) -> torch.Tensor:
    """A chunk of one sequence (its last q.shape[0] tokens) attending causally to everything before it.

    q: [n, heads, hd] -> [n, heads, hd]."""
    n, num_heads, head_dim = q.shape
    k, v = gather_kv(kv_cache, block_ids)
    k, v = k[:seq_len].to(q.dtype), v[:seq_len].to(q.dtype)
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # heads first
    gqa = num_heads != kh.shape[0]
    if n == seq_len:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        # Query i sits at position seq_len - n + i and sees keys up to and including it.
        q_pos = torch.arange(seq_len - n, seq_len)[:, None]
        mask = torch.arange(seq_len)[None, :] <= q_pos
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.transpose(0, 1)


class TorchPagedAttention:
    """The attention backend interface: write this step's K/V, then attend over each sequence's blocks."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                 meta: AttentionMetadata, scale: float) -> torch.Tensor:
        # All K/V first: a request may attend to blocks another request of the same step is writing (prefix hits).
        write_kv(kv_cache, k, v, meta.slot_mapping)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            out[:nd] = decode_attention(q[:nd], kv_cache, meta.decode_block_tables, meta.decode_seq_lens,
                                        meta.decode_max_seq_len, scale)
        for seq in meta.prefills:
            rows = slice(seq.token_start, seq.token_start + seq.num_tokens)
            out[rows] = prefill_attention(q[rows], kv_cache, seq.block_ids, seq.seq_len, scale)
        return out
