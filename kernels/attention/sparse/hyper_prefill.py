"""HyperAttention for prefill (Han et al., "HyperAttention: Long-context Attention in Near-Linear Time", ICLR 2024).

The non-causal core (`hyper_attention`) estimates softmax(Q K^T) V for many queries at once:
  1. hash queries and keys with the same angular LSH (lsh.AngularLSH: Gray-ranked sign bits, so neighbouring
     buckets hold neighbouring directions) and sort each by bucket;
  2. cut the sorted keys into blocks of `block_size` and the sorted queries into as many blocks; query block i attends
     exactly to key block i (the large entries of the attention matrix sit where query and key share buckets);
  3. every query also attends to `sample_size` keys drawn uniformly (shared by a head's queries), minus those in its
     own block, their weights scaled by nk / sample_size;
  4. the two partial softmaxes merge by their log-sum-exps.
Causal attention (`causal_hyper_attention`, the paper's recursive Algorithm 4) splits the sequence in halves: the two
diagonal halves recurse (exact at or below `min_seq_len` tokens), the off-diagonal quarter runs the core.

A prefill chunk after a cached prefix (`hyper_prefill`) is the causal recursion over the chunk merged with the core
over the prefix. The paper's core is exact below `min_seq_len` queries; here it is below `min_seq_len` keys, because a
chunk of a chunked prefill has few queries but may face many keys (ours). Plain torch: SDPA's flash kernels do the
exact parts, on any device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from afdserve.kernels.attention.sparse.lsh import AngularLSH


@dataclass(frozen=True)
class HyperParams:
    block_size: int  # b: keys per block of the block-diagonal part
    sample_size: int  # m: uniformly sampled keys for the residual
    min_seq_len: int  # exact attention at or below this many tokens (causal) / below this many keys (core)


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool = False,
                  keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention and its log-sum-exp: q [..., nq, d], k/v [..., nk, d] -> out [..., nq, d], lse [..., nq]
    (float32). keep [..., nq, nk] bool (broadcastable) masks keys out; a row with no key has lse -inf and output 0."""
    if q.device.type == "cpu" and q.dim() == 4:
        mask = None if keep is None else torch.zeros(keep.shape, dtype=q.dtype).masked_fill_(~keep, float("-inf"))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask,
                                                                              scale=scale)
    else:  # elsewhere the plain math (the CPU op is the only public-ish one that returns the LSE on every torch)
        scores = (q.float() @ k.float().transpose(-1, -2)) * scale
        if causal:
            scores = scores.masked_fill(torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1),
                                        float("-inf"))
        if keep is not None:
            scores = scores.masked_fill(~keep, float("-inf"))
        lse = scores.logsumexp(-1)
        out = (scores - lse[..., None]).exp().nan_to_num_(0.0) @ v.float()
    if keep is not None:  # the flash kernel reports lse 0 for a row with nothing to attend to
        lse = lse.masked_fill(~keep.any(-1).expand(lse.shape), float("-inf"))
    return out.to(q.dtype), lse.float()


def merge_attention(out1: torch.Tensor, lse1: torch.Tensor, out2: torch.Tensor,
                    lse2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two softmaxes over disjoint keys as one: out [..., n, d] weighted by exp(lse_i - lse); either side may be
    empty (lse -inf)."""
    lse = torch.logaddexp(lse1, lse2)
    w1 = torch.exp(lse1 - lse).nan_to_num_(0.0)[..., None]  # -inf - -inf: a row with no keys at all
    w2 = torch.exp(lse2 - lse).nan_to_num_(0.0)[..., None]
    return (w1 * out1.float() + w2 * out2.float()).to(out1.dtype), lse


def _sorted_by_bucket(x: torch.Tensor, lsh: AngularLSH) -> torch.Tensor:
    """[..., n] positions of x's rows in bucket order (stable: equal buckets keep their order)."""
    return torch.sort(lsh(x), dim=-1, stable=True).indices


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, H, n, d] rows at index [B, H, k] -> [B, H, k, d]. Whole rows by index_select: a gather with the index
    expanded over d was 4x slower here."""
    batch, heads, n, d = x.shape
    offsets = torch.arange(batch * heads, device=x.device).view(batch, heads, 1) * n
    return x.reshape(-1, d).index_select(0, (index + offsets).flatten()).view(*index.shape, d)


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    return F.pad(x, (0, 0, 0, rows - x.shape[-2])) if rows > x.shape[-2] else x


def hyper_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, params: HyperParams,
                    lsh: AngularLSH, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-causal attention of q [B, H, nq, d] over k/v [B, H, nk, d], estimated: (out [B, H, nq, d],
    lse [B, H, nq])."""
    batch, heads, nq, d = q.shape
    nk = k.shape[-2]
    if nk < params.min_seq_len:
        return attention_lse(q, k, v, scale)
    # Sort queries and keys by bucket; the keys padded to whole blocks, the queries to as many blocks.
    q_order, k_order = _sorted_by_bucket(q, lsh), _sorted_by_bucket(k, lsh)
    num_blocks = -(-nk // params.block_size)
    nk_pad, q_block = num_blocks * params.block_size, -(-nq // num_blocks)
    qs = _pad_rows(_take(q, q_order), num_blocks * q_block)
    ks, vs = _pad_rows(_take(k, k_order), nk_pad), _pad_rows(_take(v, k_order), nk_pad)

    # Block-diagonal part: sorted query block i against sorted key block i, exactly.
    blocks = (batch * heads * num_blocks, 1)
    key_is_real = None
    if nk_pad > nk:
        key_is_real = (torch.arange(nk_pad, device=q.device) < nk).view(1, num_blocks, params.block_size)
        key_is_real = key_is_real.expand(batch * heads, -1, -1).reshape(*blocks, 1, params.block_size)
    out_blk, lse_blk = attention_lse(qs.reshape(*blocks, q_block, d), ks.reshape(*blocks, params.block_size, d),
                                     vs.reshape(*blocks, params.block_size, d), scale, keep=key_is_real)
    out_blk, lse_blk = out_blk.view(batch, heads, -1, d), lse_blk.view(batch, heads, -1)

    # Residual: m keys drawn uniformly with replacement per head, those in a query's own block masked out, their
    # weight nk / m (importance weight of uniform sampling). Run per query block, so the mask is one row per block.
    m = params.sample_size
    samples = torch.randint(nk, (batch, heads, m), generator=generator).to(q.device)
    in_other_block = (samples // params.block_size)[:, :, None, :] != \
        torch.arange(num_blocks, device=q.device)[None, None, :, None]  # [B, H, blocks, m]
    ks_sampled, vs_sampled = (_take(x, samples)[:, :, None].expand(-1, -1, num_blocks, -1, -1).reshape(*blocks, m, d)
                              for x in (ks, vs))
    out_res, lse_res = attention_lse(qs.reshape(*blocks, q_block, d), ks_sampled, vs_sampled, scale,
                                     keep=in_other_block.reshape(*blocks, 1, m))
    out, lse = merge_attention(out_blk, lse_blk, out_res.view(batch, heads, -1, d),
                               lse_res.view(batch, heads, -1) + math.log(nk / m))

    # Back to the queries' own order.
    unsorted = torch.empty_like(q_order).scatter_(-1, q_order, torch.arange(nq, device=q.device).expand_as(q_order))
    return _take(out[..., :nq, :], unsorted), lse[..., :nq].gather(-1, unsorted)


def causal_hyper_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, params: HyperParams,
                           lsh: AngularLSH, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal self-attention of q/k/v [B, H, n, d], estimated by the recursion: (out, lse [B, H, n])."""
    batch, heads, n, d = q.shape
    if n <= max(params.min_seq_len, 1):
        return attention_lse(q, k, v, scale, causal=True)
    half = -(-n // 2)
    # The two diagonal halves as one recursive call, [B, 2H, n / 2, d]; an odd n padded at the end, where causality
    # keeps the padding out of every real row.
    diagonal = [_pad_rows(x, 2 * half).reshape(batch, 2 * heads, half, d) for x in (q, k, v)]
    out_diag, lse_diag = causal_hyper_attention(*diagonal, scale, params, lsh, generator)
    out_diag, lse_diag = out_diag.reshape(batch, heads, 2 * half, d)[..., :n, :], lse_diag.reshape(batch, heads, -1)
    # The second half's queries also see all of the first half.
    out_off, lse_off = hyper_attention(q[..., half:, :], k[..., :half, :], v[..., :half, :], scale, params, lsh,
                                       generator)
    out_second, lse_second = merge_attention(out_diag[..., half:, :], lse_diag[..., half:n], out_off, lse_off)
    out = torch.cat([out_diag[..., :half, :], out_second], dim=-2)
    return out, torch.cat([lse_diag[..., :half], lse_second], dim=-1)


def hyper_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, params: HyperParams,
                  lsh: AngularLSH, generator: torch.Generator) -> torch.Tensor:
    """A prefill chunk, the sequence's last n tokens: q [n, heads, hd]; k/v [kv_heads, seq_len, hd] (every token
    with KV, the chunk's included) -> [n, heads, hd]."""
    n, heads, d = q.shape
    kv_heads, seq_len = k.shape[0], k.shape[1]
    qh = q.transpose(0, 1)[None]  # [1, heads, n, d]
    # GQA: each query head gets its KV head's keys (the sort order is per query head anyway).
    kh, vh = (x.repeat_interleave(heads // kv_heads, dim=0)[None] for x in (k, v))
    cached = seq_len - n
    out, lse = causal_hyper_attention(qh, kh[..., cached:, :], vh[..., cached:, :], scale, params, lsh, generator)
    if cached:
        out_prefix, lse_prefix = hyper_attention(qh, kh[..., :cached, :], vh[..., :cached, :], scale, params, lsh,
                                                 generator)
        out, _ = merge_attention(out, lse, out_prefix, lse_prefix)
    return out[0].transpose(0, 1)
