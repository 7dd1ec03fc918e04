"""Multi-head Latent Attention over a paged latent cache, in plain torch (DeepSeek-V2, arXiv:2405.04434, sec. 2.1).

The cache of one layer is `kv_cache_shape(num_blocks, block_size, 1, kv_lora_rank + rope_dim, planes=1)`: a single
plane and a single head holding, per token, its normalized latent c_KV and its RoPE'd shared key k_pe; no K and V
(576 values a token for DeepSeek-V2/V3, against 2 x 128 heads x 128 for MHA). In the absorbed form
(models/layers/mla.py folds W_UK into the query and W_UV into the output) every query head attends over these
entries directly:

    scores = [q_nope W_UK | q_pe] . [c_KV | k_pe]     the key is the whole entry
    out    = softmax(scores * scale) . c_KV            the value is the entry's first kv_lora_rank values

which is MQA with one shared head whose value is a prefix of its key. The step's batch is described by the same
AttentionMetadata as every backend's (decodes first, then prefill chunks). Under the Triton backend, decodes run
kernels/attention/triton_mla.py, which this module's torch decode is the reference of.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from afdserve.kernels.attention.metadata import AttentionMetadata


def write_latent(kv_cache: torch.Tensor, entries: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Stores the step's new entries ([T, D]) at slot = block_id * block_size + offset."""
    slots = kv_cache.view(-1, kv_cache.shape[-1])
    slots.index_copy_(0, slot_mapping, entries.to(kv_cache.dtype))


def gather_latent(kv_cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """The entries of `block_ids` ([n]) laid end to end: [n * block_size, D]."""
    return kv_cache[0, 0].index_select(0, block_ids).view(-1, kv_cache.shape[-1])


def mla_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                         mask_bias: torch.Tensor, scale: float, value_dim: int) -> torch.Tensor:
    """One query token per sequence: q [B, heads, D] -> [B, heads, value_dim]. block_tables [B, n] (padded);
    mask_bias [B, 1, n * block_size]: 0 for each sequence's tokens, -inf past them."""
    num_seqs, num_heads, dim = q.shape
    keys = gather_latent(kv_cache, block_tables.reshape(-1)).view(num_seqs, 1, -1, dim).to(q.dtype)
    # The heads are the rows of one query block per sequence against its single shared head (as GQA groups are
    # in torch_paged.decode_attention).
    out = F.scaled_dot_product_attention(q.unsqueeze(1), keys, keys[..., :value_dim],
                                         attn_mask=mask_bias.unsqueeze(2).to(q.dtype), scale=scale)
    return out.view(num_seqs, num_heads, value_dim)


def mla_prefill_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int,
                          scale: float, value_dim: int) -> torch.Tensor:
    """A chunk of one sequence (its last q.shape[0] tokens) attending causally to everything before it:
    q [n, heads, D] -> [n, heads, value_dim]."""
    n, num_heads, dim = q.shape
    keys = gather_latent(kv_cache, block_ids)[:seq_len].to(q.dtype)[None, None]  # [1, 1, seq_len, D]
    # Rows are (token, head) pairs, token-major; row r is token r // heads at position seq_len - n + r // heads.
    q_pos = torch.arange(seq_len - n, seq_len, device=q.device).repeat_interleave(num_heads)
    visible = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]
    out = F.scaled_dot_product_attention(q.reshape(1, 1, n * num_heads, dim), keys, keys[..., :value_dim],
                                         attn_mask=visible, scale=scale)
    return out.view(n, num_heads, value_dim)


def _torch_decode(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                  value_dim: int) -> torch.Tensor:
    return mla_decode_attention(q, kv_cache, meta.decode_block_tables, meta.decode_mask_bias, scale, value_dim)


def _triton_decode(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                   value_dim: int) -> torch.Tensor:
    from afdserve.kernels.attention.triton_mla import mla_paged_decode
    return mla_paged_decode(q, kv_cache, meta.decode_block_tables, meta.decode_seq_lens, scale, value_dim)


class MLAPagedAttention:
    """MLA's attention call: writes the step's entries ([T, D]), then attends: q [T, heads, D] (absorbed queries)
    -> [T, heads, value_dim], each head's output in the latent space. Decodes run `decode` (the torch reference
    above, or kernels/attention/triton_mla.py); prefill chunks run in torch."""

    def __init__(self, decode=_torch_decode):
        self.decode = decode

    def __call__(self, q: torch.Tensor, entries: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                 scale: float, value_dim: int) -> torch.Tensor:
        write_latent(kv_cache, entries, meta.slot_mapping)  # all first: a prefix hit may read a block written now
        out = q.new_empty(q.shape[0], q.shape[1], value_dim)
        if meta.num_decodes:
            out[:meta.num_decodes] = self.decode(q[:meta.num_decodes], kv_cache, meta, scale, value_dim)
        for seq in meta.prefills:
            rows = slice(seq.token_start, seq.token_start + seq.num_tokens)
            out[rows] = mla_prefill_attention(q[rows], kv_cache, seq.block_ids, seq.seq_len, scale, value_dim)
        return out


def mla_attention_backend(backend_name: str) -> MLAPagedAttention:
    """MLA's attention for the engine's attention backend ("torch" or "triton": its decode kernel)."""
    return MLAPagedAttention(_triton_decode if backend_name == "triton" else _torch_decode)
