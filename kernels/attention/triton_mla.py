"""MLA decode over the paged latent cache in Triton (the CUDA path; tested on CPU under TRITON_INTERPRET). Same
contract as mla_paged.mla_decode_attention, its reference: q [B, heads, latent + rope] absorbed queries, the cache
[1, 1, blocks, block_size, latent + rope], out [B, heads, latent].

    program (sequence s, tile of BLOCK_H query heads):
        q      the heads' latent part [BLOCK_H, LATENT] and rope part [BLOCK_H, ROPE], loaded once
        keys   tokens [0, seq_len) of s, BLOCK_N per tile, token t at (block_tables[s, t // P], t % P): its latent
               c [BLOCK_N, LATENT] and rope key k_pe [BLOCK_N, ROPE], read once for all BLOCK_H heads (MQA)
        score  q_lat . c + q_pe . k_pe, online softmax in base 2, fp32 accumulators
        value  acc [BLOCK_H, LATENT] += p @ c: the value is the same latent tile already loaded for the score

The latent (512 for DeepSeek-V2/V3) and the rope part (64) are separate power-of-two tiles: one 576-wide tile would
pad to 1024. Under the interpreter the dot operands are upcast to fp32 and reductions use our own combine
functions (see triton_paged.py). Decode only: prefill chunks take the torch path (mla_paged.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from afdserve.kernels.attention.triton_paged import online_softmax_step

_LOG2E = 1.4426950408889634


@triton.jit
def _mla_decode_kernel(q_ptr, cache_ptr, out_ptr, block_tables_ptr, seq_lens_ptr, scale_log2,
                       stride_qb, stride_qh, stride_qd, stride_cblk, stride_ctok, stride_cd,
                       stride_ob, stride_oh, stride_od, stride_bt,
                       NUM_HEADS: tl.constexpr, LATENT: tl.constexpr, ROPE: tl.constexpr, PAGE: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
                       DOT_FP32: tl.constexpr):
    seq = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_mask = heads < NUM_HEADS
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    offs_l = tl.arange(0, BLOCK_L)
    offs_r = tl.arange(0, BLOCK_R)
    l_mask = offs_l < LATENT
    r_mask = offs_r < ROPE
    q_row = q_ptr + seq.to(tl.int64) * stride_qb + heads[:, None] * stride_qh
    q_lat = tl.load(q_row + offs_l[None, :] * stride_qd, mask=head_mask[:, None] & l_mask[None, :], other=0.0)
    q_pe = tl.load(q_row + (LATENT + offs_r[None, :]) * stride_qd, mask=head_mask[:, None] & r_mask[None, :],
                   other=0.0)
    kv_ty = tl.float32 if DOT_FP32 else q_ptr.dtype.element_ty
    q_lat, q_pe = q_lat.to(kv_ty), q_pe.to(kv_ty)

    m_i = tl.full((BLOCK_H,), -1.0e30, dtype=tl.float32)
    l_i = tl.full((BLOCK_H,), 0.0, dtype=tl.float32)
    acc = tl.full((BLOCK_H, BLOCK_L), 0.0, dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for start in range(0, seq_len, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < seq_len
        block_ids = tl.load(table + offs_n // PAGE, mask=n_mask, other=0).to(tl.int64)
        token = cache_ptr + block_ids[:, None] * stride_cblk + (offs_n % PAGE)[:, None] * stride_ctok
        c = tl.load(token + offs_l[None, :] * stride_cd, mask=n_mask[:, None] & l_mask[None, :], other=0.0)
        k_pe = tl.load(token + (LATENT + offs_r[None, :]) * stride_cd, mask=n_mask[:, None] & r_mask[None, :],
                       other=0.0)
        c, k_pe = c.to(kv_ty), k_pe.to(kv_ty)
        if DOT_FP32:
            s = tl.dot(q_lat, tl.trans(c), input_precision="ieee") + tl.dot(q_pe, tl.trans(k_pe),
                                                                             input_precision="ieee")
        else:
            s = tl.dot(q_lat, tl.trans(c)) + tl.dot(q_pe, tl.trans(k_pe))
        s = tl.where(n_mask[None, :], s * scale_log2, float("-inf"))
        p, alpha, m_new, l_i = online_softmax_step(s, m_i, l_i)
        if DOT_FP32:
            pv = tl.dot(p, c, input_precision="ieee")
        else:
            pv = tl.dot(p.to(c.dtype), c)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(out_ptr + seq.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_l[None, :] * stride_od,
             o.to(out_ptr.dtype.element_ty), mask=head_mask[:, None] & l_mask[None, :])


def mla_paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                     scale: float, value_dim: int, block_h: int = 16, block_n: int = 32) -> torch.Tensor:
    """q [B, heads, latent + rope] -> [B, heads, latent]; value_dim = latent (kv_lora_rank). block_tables [B, n]
    (padded), seq_lens [B]: tokens with KV, this step's included."""
    num_seqs, num_heads, dim = q.shape
    if kv_cache.dim() != 5 or kv_cache.shape[:2] != (1, 1) or kv_cache.shape[4] != dim:
        raise ValueError(f"an MLA cache is [1, 1, blocks, block_size, {dim}], got {tuple(kv_cache.shape)}")
    if not 0 < value_dim < dim:
        raise ValueError(f"value_dim must be the latent part of the {dim}-wide entry, got {value_dim}")
    cache = kv_cache[0, 0]
    block_h = max(16, block_h)  # tl.dot's smallest tile
    out = torch.empty(num_seqs, num_heads, value_dim, dtype=q.dtype, device=q.device)
    grid = (num_seqs, triton.cdiv(num_heads, block_h))
    _mla_decode_kernel[grid](
        q, cache, out, block_tables, seq_lens, scale * _LOG2E, *q.stride(), *cache.stride(), *out.stride(),
        block_tables.stride(0),
        NUM_HEADS=num_heads, LATENT=value_dim, ROPE=dim - value_dim, PAGE=cache.shape[1],
        BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_L=triton.next_power_of_2(value_dim),
        BLOCK_R=max(16, triton.next_power_of_2(dim - value_dim)),
        DOT_FP32=q.dtype == torch.float32 or triton.knobs.runtime.interpret)
    return out
