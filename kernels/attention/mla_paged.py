"""Multi-head Latent Attention over a paged latent cache, in plain torch (DeepSeek-V2, arXiv:2405.04434, sec. 2.1).

The cache of one layer is `kv_cache_shape(num_blocks, block_size, 1, kv_lora_rank + rope_dim, planes=1)`: a single
plane and a single head holding, per token, its normalized latent c_KV and its RoPE'd shared key k_pe; no K and V
(576 values a token for DeepSeek-V2/V3, against 2 x 128 heads x 128 for MHA). In the absorbed form (W_UK folded into
the query and W_UV into the output) every query head attends over these entries directly:

    scores = [q_nope W_UK | q_pe] . [c_KV | k_pe]     the key is the whole entry
    out    = softmax(scores * scale) . c_KV            the value is the entry's first kv_lora_rank values

which is MQA with one shared head whose value is a prefix of its key: what decodes run (under the Triton backend
in kernels/attention/triton_mla.py, which this module's torch decode is the reference of). A prefill chunk, with
many queries over the same latents, runs the decompressed form instead (keys and values expanded per head, as
vLLM and SGLang do): mla_prefill_attention. The step's batch is described by the same AttentionMetadata as every
backend's (decodes first, then prefill chunks).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from afdserve.kernels.attention.metadata import AttentionMetadata
from afdserve.kernels.attention.torch_paged import chunk_causal_mask


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


def mla_prefill_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, block_ids: torch.Tensor,
                          seq_len: int, scale: float, w_uk: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
    """A chunk of one sequence (its last n tokens) attending causally to everything before it, in the decompressed
    form: q_nope [n, heads, nope], q_pe [n, heads, rope] -> [n, heads, v_head_dim]. Each cached latent is expanded
    once into per-head keys [c W_UK^T | k_pe] and values c W_UV^T (w_uk [heads, nope, L], w_uv [heads, v, L]),
    which for a chunk of many queries costs less than moving every query into the latent space
    (`python -m afdserve.bench.mla_prefill`, DeepSeek-V2-Lite's shapes; bench/results/issue18-mla/)."""
    n, num_heads, nope = q_nope.shape
    entries = gather_latent(kv_cache, block_ids)[:seq_len].to(q_nope.dtype)
    latent, k_pe = entries.split([w_uk.shape[2], q_pe.shape[2]], dim=-1)
    k_nope = torch.einsum("sl,hnl->hsn", latent, w_uk)  # [heads, seq_len, nope]
    values = torch.einsum("sl,hvl->hsv", latent, w_uv)  # [heads, seq_len, v]
    keys = torch.cat([k_nope, k_pe.unsqueeze(0).expand(num_heads, -1, -1)], dim=-1)
    q = torch.cat([q_nope, q_pe], dim=-1).transpose(0, 1)  # [heads, n, nope + rope]
    if n == seq_len:
        out = F.scaled_dot_product_attention(q[None], keys[None], values[None], is_causal=True, scale=scale)
    else:
        out = F.scaled_dot_product_attention(q[None], keys[None], values[None],
                                             attn_mask=chunk_causal_mask(n, seq_len, q.device), scale=scale)
    return out[0].transpose(0, 1)


def _torch_decode(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                  value_dim: int) -> torch.Tensor:
    return mla_decode_attention(q, kv_cache, meta.decode_block_tables, meta.decode_mask_bias, scale, value_dim)


def _triton_decode(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                   value_dim: int) -> torch.Tensor:
    from afdserve.kernels.attention.triton_mla import mla_paged_decode
    return mla_paged_decode(q, kv_cache, meta.decode_block_tables, meta.decode_seq_lens, scale, value_dim)


class MLAPagedAttention:
    """MLA's attention call: writes the step's entries ([T, D]), then attends, q_nope [T, heads, nope] and q_pe
    [T, heads, rope] -> [T, heads, v_head_dim], with W_UK and W_UV (kv_b_proj's rows per head, [heads, nope, L] and
    [heads, v, L]). Decodes run absorbed, through `decode` (the torch reference above, or
    kernels/attention/triton_mla.py), and prefill chunks decompressed, in torch."""

    def __init__(self, decode=_torch_decode):
        self.decode = decode

    def __call__(self, q_nope: torch.Tensor, q_pe: torch.Tensor, entries: torch.Tensor, kv_cache: torch.Tensor,
                 meta: AttentionMetadata, scale: float, w_uk: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
        write_latent(kv_cache, entries, meta.slot_mapping)  # all first: a prefix hit may read a block written now
        out = q_nope.new_empty(q_nope.shape[0], q_nope.shape[1], w_uv.shape[1])
        d = meta.num_decodes
        if d:
            q = torch.cat([torch.einsum("thn,hnl->thl", q_nope[:d], w_uk), q_pe[:d]], dim=-1)  # absorb W_UK
            out_latent = self.decode(q, kv_cache, meta, scale, w_uk.shape[2])  # [d, heads, L]
            out[:d] = torch.einsum("thl,hvl->thv", out_latent, w_uv)  # absorb W_UV
        for seq in meta.prefills:
            rows = slice(seq.token_start, seq.token_start + seq.num_tokens)
            out[rows] = mla_prefill_attention(q_nope[rows], q_pe[rows], kv_cache, seq.block_ids, seq.seq_len, scale,
                                              w_uk, w_uv)
        return out


def mla_attention_backend(backend_name: str) -> MLAPagedAttention:
    """MLA's attention for the engine's attention backend ("torch" or "triton": its decode kernel)."""
    return MLAPagedAttention(_triton_decode if backend_name == "triton" else _torch_decode)
