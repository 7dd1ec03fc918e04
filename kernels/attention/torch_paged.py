"""Paged attention in plain torch: the CPU backend and the reference for the Triton kernels.

KV cache per layer: [2, num_kv_heads, num_blocks, block_size, head_dim] (index 0 = K, 1 = V). Keeping K/V and the
head outermost means one `index_select` over the block axis gathers a sequence's (or a batch's) K and V straight
into the [kv_heads, tokens, head_dim] layout that matmul and SDPA take, with no second re-layout copy.
GQA: queries are grouped per KV head, so each K/V head is used by its group without being repeated.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from afdserve.kernels.attention.metadata import AttentionMetadata, PrefillSeq
from afdserve.kernels.attention.sparse.selection import selected_mask_bias


def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                   planes: int = 2) -> tuple[int, ...]:
    """planes: 2 for K and V; 1 for MLA's latent cache (kernels/attention/mla_paged.py)."""
    return (planes, num_kv_heads, num_blocks, block_size, head_dim)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Stores the step's new K/V ([T, kv_heads, head_dim]) at slot = block_id * block_size + offset."""
    two, kv_heads, num_blocks, block_size, head_dim = kv_cache.shape
    slots = kv_cache.view(2, kv_heads, num_blocks * block_size, head_dim)
    slots.index_copy_(2, slot_mapping, torch.stack([k, v]).transpose(1, 2).to(kv_cache.dtype))


def store_kv(kv_cache, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
    """The step's new K/V into a plain cache tensor, or into a kv_quant.QuantizedKVCache (quantized on write)."""
    if isinstance(kv_cache, torch.Tensor):
        write_kv(kv_cache, k, v, meta.slot_mapping)
    else:
        kv_cache.write(k, v, meta.slot_mapping, meta.kv_plan)


def gather_kv(kv_cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """K and V of `block_ids` ([n]) laid end to end: [2, kv_heads, n * block_size, head_dim].

    A quantized cache (kv_quant.QuantizedKVCache) returns them dequantized, so the attention below is shared."""
    if not isinstance(kv_cache, torch.Tensor):
        return kv_cache.gather(block_ids)
    two, kv_heads, num_blocks, block_size, head_dim = kv_cache.shape
    return kv_cache.index_select(2, block_ids).view(2, kv_heads, -1, head_dim)


def decode_mask_bias(seq_lens: torch.Tensor, width: int) -> torch.Tensor:
    """decode_attention's mask_bias for block tables `width` tokens wide: [B, 1, width], 0 for each sequence's
    seq_lens[b] real tokens and -inf for the padding after them."""
    pad = torch.arange(width, device=seq_lens.device)[None, :] >= seq_lens[:, None]
    return torch.zeros(pad.shape, device=seq_lens.device).masked_fill_(pad, float("-inf")).unsqueeze(1)


def gather_kv_per_head(kv_cache, block_tables: torch.Tensor) -> torch.Tensor:
    """K and V of each KV head's own blocks, block_tables [B, kv_heads, n]: [2, B, kv_heads, n * block_size, hd]."""
    num_seqs, kv_heads, n = block_tables.shape
    if isinstance(kv_cache, torch.Tensor):
        heads = torch.arange(kv_heads, device=block_tables.device)[None, :, None]
        return kv_cache[:, heads, block_tables].view(2, num_seqs, kv_heads, -1, kv_cache.shape[-1])
    # A quantized cache dequantizes whole blocks (all heads): gather the lot, keep each head's own.
    kv = kv_cache.gather(block_tables.reshape(-1))  # [2, kv_heads, B * kv_heads * n * bs, hd]
    kv = kv.view(2, kv_heads, num_seqs, kv_heads, -1, kv.shape[-1])
    return torch.diagonal(kv, dim1=1, dim2=3).permute(0, 1, 4, 2, 3)


def decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                     mask_bias: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per sequence. q: [B, heads, hd] -> [B, heads, hd].

    block_tables: [B, n] (padded) read by every KV head, or [B, kv_heads, n], each head's own pages (an attention
    policy's, kernels/attention/sparse); mask_bias: [B, 1 or kv_heads, n * block_size], 0 for real tokens (or a
    page's log-weight) and -inf for padding."""
    num_seqs, num_heads, head_dim = q.shape
    if block_tables.dim() == 2:
        kv = gather_kv(kv_cache, block_tables.reshape(-1))  # [2, kvh, B * L, hd]
        kv_heads = kv.shape[1]
        k, v = kv.view(2, kv_heads, num_seqs, -1, head_dim).transpose(1, 2).to(q.dtype)  # each [B, kvh, L, hd]
    else:
        kv_heads = block_tables.shape[1]
        k, v = gather_kv_per_head(kv_cache, block_tables).to(q.dtype)
    # A KV head's query heads are its group's rows of one plain attention ([B, kvh, group, hd]), not SDPA's
    # enable_gqa: on an AVX-512 host without AMX that made a bf16 decode of 32 x 256 tokens 4.3 ms against 0.68 ms
    # grouped (fp32: 0.63 and 0.62 ms). The mask ([B, 1 or kvh, 1, L]) is the same for every row of a group.
    grouped_q = q.view(num_seqs, kv_heads, num_heads // kv_heads, head_dim)
    out = F.scaled_dot_product_attention(grouped_q, k, v, attn_mask=mask_bias.unsqueeze(2).to(q.dtype), scale=scale)
    return out.view(num_seqs, num_heads, head_dim)


def chunk_causal_mask(n: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """[n, seq_len] bool: query i of a chunk, at position seq_len - n + i, sees the keys up to and including it."""
    q_pos = torch.arange(seq_len - n, seq_len, device=device)[:, None]
    return torch.arange(seq_len, device=device)[None, :] <= q_pos


def prefill_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int,
                      scale: float) -> torch.Tensor:
    """A chunk of one sequence (its last q.shape[0] tokens) attending causally to everything before it.

    q: [n, heads, hd] -> [n, heads, hd]. Inputs are 4-D because only then does SDPA take its CPU flash kernel
    (5x faster here than the math fallback that 3-D GQA inputs get)."""
    n, num_heads, head_dim = q.shape
    k, v = gather_kv(kv_cache, block_ids)[:, None, :, :seq_len].to(q.dtype)  # each [1, kvh, seq_len, hd]
    qh = q.transpose(0, 1).unsqueeze(0)
    gqa = num_heads != k.shape[1]
    if n == seq_len:
        out = F.scaled_dot_product_attention(qh, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(qh, k, v, attn_mask=chunk_causal_mask(n, seq_len, q.device), scale=scale,
                                             enable_gqa=gqa)
    return out[0].transpose(0, 1)


class TorchPagedAttention:
    """The attention backend interface: write this step's K/V, then attend over each sequence's blocks (or, for
    decodes under an attention policy, the blocks it chose)."""
    name = "torch"  # what MLA's own attention follows (kernels/attention/mla_paged.mla_attention_backend)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                 meta: AttentionMetadata, scale: float, layer: int) -> torch.Tensor:
        # All K/V first: a request may attend to blocks another request of the same step is writing (prefix hits).
        store_kv(kv_cache, k, v, meta)
        if meta.sparse is not None:
            meta.sparse.on_write(layer, k, meta.slot_mapping)
        if not meta.prefills and meta.sparse is None:
            return decode_attention(q, kv_cache, meta.decode_block_tables, meta.decode_mask_bias, scale)
        out = torch.empty_like(q)
        for start, stop, chosen in meta.decode_segments(layer, q, kv_cache, scale):
            rows = slice(start, stop)
            if chosen is None:
                out[rows] = decode_attention(q[rows], kv_cache, meta.decode_block_tables[rows],
                                             meta.decode_mask_bias[rows], scale)
            else:
                out[rows] = decode_attention(q[rows], kv_cache, chosen.block_tables,
                                             selected_mask_bias(chosen, meta.block_size), scale)
        for seq in meta.prefills:
            rows = slice(seq.token_start, seq.token_start + seq.num_tokens)
            if seq.policy is None:
                out[rows] = prefill_attention(q[rows], kv_cache, seq.block_ids, seq.seq_len, scale)
            else:
                out[rows] = policy_prefill(seq, q[rows], kv_cache, scale, layer)
        return out


def policy_prefill(seq: PrefillSeq, q: torch.Tensor, kv_cache: torch.Tensor, scale: float,
                   layer: int) -> torch.Tensor:
    """A prefill chunk whose attention policy computes it (both backends): q [n, heads, hd] -> [n, heads, hd]."""
    k, v = gather_kv(kv_cache, seq.block_ids)[:, :, :seq.seq_len].to(q.dtype)  # each [kv_heads, seq_len, hd]
    return seq.policy.prefill(layer, q, k, v, scale, seq.seed)
