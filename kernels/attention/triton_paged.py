"""Paged attention in Triton (the CUDA backend; tested on CPU under TRITON_INTERPRET). Same contract as torch_paged.py.

One kernel serves decodes and prefill chunks: a sequence contributes a chunk of n >= 1 new queries, query i sitting
at position seq_len - n + i and seeing the keys at positions <= its own (a decode is the chunk n = 1).

    program (sequence s, query tile j, KV head h [x split]):
        rows   BLOCK_M = BLOCK_Q query tokens x G query heads of KV head h (row r: token j*BLOCK_Q + r // G,
               head h*G + r % G), padded to >= 16 for tl.dot and masked: a K/V tile is loaded once per KV head
               and serves all G heads of its group (GQA/MQA packing).
        keys   tokens [0, kv_end) of s, BLOCK_N per tile, token t read at (block_tables[s, t // P], t % P);
               online softmax in base 2 (scores * scale * log2 e), fp32 accumulators. Under an attention
               policy (kernels/attention/sparse) a decode's KV head h has a table and a length of its own
               (block_tables[s, h], seq_lens[s, h]: the kept pages laid end to end) and optionally a log-weight
               per kept page added to its tokens' logits; dense tables are the same for every head (stride 0).
        split  with NUM_SPLITS > 1 (FlashDecoding) the program takes its 1/NUM_SPLITS of [0, kv_end) and
               writes (o_split normalized by its own sum, lse_split) in fp32; _merge_splits_kernel then takes
               o = sum_s exp(lse_s - M) o_s / sum_s exp(lse_s - M), M = max_s lse_s (empty splits: lse = -inf).
               With one split the program writes the output directly.

K/V tiles are loaded by _load_kv_tile, which also reads an int8 / fp8_e4m3 cache: codes of one byte plus an
fp16 scale per (K or V, head, token), kv_quant.TokenScaledStore's layout. The codes convert exactly to q's dtype and
the scales, one per key token, are applied to the [BLOCK_M, BLOCK_N] scores and probabilities rather than to the
[BLOCK_N, head_dim] tiles: q.(c_k s_k) = (q.c_k) s_k and sum_n p_n (c_v,n s_v,n) = sum_n (p_n s_v,n) c_v,n, 8x fewer
multiplies at head_dim 128 (on an H100 the tile-wise form ran no faster than bf16). Such a cache holds keys
rotated by kv_quant.rotate_keys; TritonPagedAttention rotates the queries to match (q.k = (qH).(kH)).
fp32 inputs multiply in IEEE fp32 (no TF32). Under TRITON_INTERPRET the dot operands are upcast to fp32, because the
interpreter multiplies bf16 as raw bits (see kernels/moe/triton_moe.py), and reductions use tl.reduce with our own
combine functions: the standard library's @jit helpers (tl.max, tl.sum, tl.zeros, tl.cdiv) run under the interpreter
only if triton itself was imported with TRITON_INTERPRET set.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from afdserve.kernels.attention.metadata import AttentionMetadata
from afdserve.kernels.attention.torch_paged import policy_prefill, store_kv

_LOG2E = 1.4426950408889634


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _sum_combine(a, b):
    return a + b


@triton.jit
def online_softmax_step(s, m_i, l_i):
    """One key tile of a base-2 online softmax: s [rows, keys] scaled logits (-inf where masked), m_i / l_i the
    rows' running max and sum. Returns p = exp2(s - new max), alpha (what the accumulator is rescaled by), the new
    max and the new sum."""
    m_new = tl.maximum(m_i, tl.reduce(s, 1, _max_combine))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + tl.reduce(p, 1, _sum_combine)


# The KV_QUANT constexpr: what the cache's elements are (constexpr globals: the only globals a kernel may read).
KV_FULL, KV_INT8, KV_FP8 = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _load_kv_tile(base_ptr, block_ids, token_offsets, offs_d, n_mask, d_mask, stride_blk, stride_tok, stride_d,
                  out_ty: tl.constexpr, KV_QUANT: tl.constexpr, D_MAJOR: tl.constexpr):
    """[BLOCK_N, BLOCK_D] tile of one K or V head at the given tokens (block ids int64: caches pass 2^31 elements)
    in out_ty, or with D_MAJOR its transpose [BLOCK_D, BLOCK_N] loaded as such; of a quantized cache, its codes
    (exact in bf16 / fp16 / fp32: int8 or E4M3's 3-bit mantissa)."""
    token_ptrs = base_ptr + block_ids * stride_blk + token_offsets * stride_tok
    if D_MAJOR:
        x = tl.load(token_ptrs[None, :] + offs_d[:, None] * stride_d, mask=d_mask[:, None] & n_mask[None, :], other=0)
    else:
        x = tl.load(token_ptrs[:, None] + offs_d[None, :] * stride_d, mask=n_mask[:, None] & d_mask[None, :], other=0)
    if KV_QUANT == KV_FP8:
        x = x.to(tl.float8e4nv, bitcast=True)
    return x.to(out_ty)


@triton.jit
def _load_kv_scales(scale_base_ptr, block_ids, token_offsets, n_mask, stride_sblk, stride_stok):
    """[BLOCK_N] fp32 scales of one K or V head at the given tokens."""
    return tl.load(scale_base_ptr + block_ids * stride_sblk + token_offsets * stride_stok, mask=n_mask,
                   other=0.0).to(tl.float32)


@triton.jit
def _paged_attention_kernel(
        q_ptr, kv_ptr, kv_scale_ptr, out_ptr, part_out_ptr, part_lse_ptr, block_tables_ptr, seq_lens_ptr,
        page_weights_ptr, query_start_ptr, scale_log2,
        stride_qt, stride_qh, stride_qd,
        stride_kv, stride_kvh, stride_blk, stride_tok, stride_kd,
        stride_skv, stride_skh, stride_sblk, stride_stok,
        stride_ot, stride_oh, stride_od,
        stride_bt, stride_bth, stride_sls, stride_slh, stride_pws, stride_pwh,
        stride_pt, stride_ph, stride_ps, stride_lt, stride_lh,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, NUM_SPLITS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        KV_QUANT: tl.constexpr, KEYS_D_MAJOR: tl.constexpr, DOT_FP32: tl.constexpr, PAGE_WEIGHTS: tl.constexpr):
    seq = tl.program_id(0)
    q_tile = tl.program_id(1)
    kv_head = tl.program_id(2) // NUM_SPLITS
    split = tl.program_id(2) % NUM_SPLITS
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    if q_tile * BLOCK_Q >= q_len:
        return
    # int32 key positions and loop bounds, long or int input
    seq_len = tl.load(seq_lens_ptr + seq * stride_sls + kv_head * stride_slh).to(tl.int32)

    offs_m = tl.arange(0, BLOCK_M)
    tok = q_tile * BLOCK_Q + offs_m // GROUP  # query index within the chunk
    head = kv_head * GROUP + offs_m % GROUP
    row_mask = (offs_m < BLOCK_Q * GROUP) & (tok < q_len)
    row = (q_start + tok).to(tl.int64)  # row of q / out in the flat batch
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(q_ptr + row[:, None] * stride_qt + head[:, None] * stride_qh
                + offs_d[None, :] * stride_qd, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    key_limit = seq_len - q_len + tok + 1  # [BLOCK_M]: row sees keys < key_limit (causal)
    last_tok = tl.minimum((q_tile + 1) * BLOCK_Q, q_len)
    kv_end = seq_len - q_len + last_tok
    per_split = ((kv_end + NUM_SPLITS - 1) // NUM_SPLITS + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    kv_start = split * per_split
    kv_stop = tl.minimum(kv_end, kv_start + per_split)

    # Finite start for the running max: a row with every key masked in a tile keeps alpha = 1 and p = 0, no NaN.
    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    l_i = tl.full((BLOCK_M,), 0.0, dtype=tl.float32)
    acc = tl.full((BLOCK_M, BLOCK_D), 0.0, dtype=tl.float32)
    k_base = kv_ptr + kv_head.to(tl.int64) * stride_kvh
    v_base = k_base + stride_kv
    k_scale_base = kv_scale_ptr + kv_head.to(tl.int64) * stride_skh
    v_scale_base = k_scale_base + stride_skv
    kv_ty = tl.float32 if DOT_FP32 else q_ptr.dtype.element_ty
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt + kv_head * stride_bth
    page_weights = page_weights_ptr + seq.to(tl.int64) * stride_pws + kv_head * stride_pwh
    for start in range(kv_start, kv_stop, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < kv_stop
        block_ids = tl.load(table + offs_n // PAGE, mask=n_mask, other=0).to(tl.int64)
        token_offsets = offs_n % PAGE
        k = _load_kv_tile(k_base, block_ids, token_offsets, offs_d, n_mask, d_mask, stride_blk, stride_tok,
                          stride_kd, kv_ty, KV_QUANT, KEYS_D_MAJOR)
        if not KEYS_D_MAJOR:
            k = tl.trans(k)  # [BLOCK_D, BLOCK_N] either way
        v = _load_kv_tile(v_base, block_ids, token_offsets, offs_d, n_mask, d_mask, stride_blk, stride_tok,
                          stride_kd, kv_ty, KV_QUANT, False)
        if DOT_FP32:
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        if KV_QUANT != KV_FULL:
            s = s * _load_kv_scales(k_scale_base, block_ids, token_offsets, n_mask, stride_sblk, stride_stok)[None, :]
        # key_limit <= kv_end, and a tile never crosses into the next split (splits are whole tiles), so the causal
        # test alone also masks the tile's tokens past kv_stop.
        s = tl.where(offs_n[None, :] < key_limit[:, None], s * scale_log2, float("-inf"))
        if PAGE_WEIGHTS:
            s = s + (tl.load(page_weights + offs_n // PAGE, mask=n_mask, other=0.0) * 1.4426950408889634)[None, :]
        p, alpha, m_new, l_i = online_softmax_step(s, m_i, l_i)
        if KV_QUANT != KV_FULL:  # the row sum above is of p itself; the value scales weight only p @ V
            p = p * _load_kv_scales(v_scale_base, block_ids, token_offsets, n_mask, stride_sblk, stride_stok)[None, :]
        if DOT_FP32:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    has_keys = l_i > 0.0  # false for padding rows and for an empty split
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    store_mask = row_mask[:, None] & d_mask[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + row[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 o.to(out_ptr.dtype.element_ty), mask=store_mask)
    else:
        # Natural-log LSE of the scaled logits, as the split merge (and any other producer of partials) uses.
        lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * 0.6931471805599453,
                       float("-inf"))
        part = row * stride_pt + head * stride_ph + split * stride_ps
        tl.store(part_out_ptr + part[:, None] + offs_d[None, :], o, mask=store_mask)
        tl.store(part_lse_ptr + row * stride_lt + head * stride_lh + split, lse, mask=row_mask)


@triton.jit
def _merge_splits_kernel(part_out_ptr, part_lse_ptr, out_ptr,
                         stride_pt, stride_ph, stride_ps, stride_lt, stride_lh, stride_ot, stride_oh, stride_od,
                         HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
                         BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """One (query row, head): o = sum_s w_s o_s / sum_s w_s with w_s = exp(lse_s - max lse)."""
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < NUM_SPLITS
    lse = tl.load(part_lse_ptr + row * stride_lt + head * stride_lh + offs_s, mask=s_mask, other=float("-inf"))
    weight = tl.exp(lse - tl.reduce(lse, 0, _max_combine))  # split 0 is never empty, so the max is finite
    o = tl.load(part_out_ptr + row * stride_pt + head * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
                mask=s_mask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    merged = tl.reduce(o * weight[:, None], 0, _sum_combine) / tl.reduce(weight, 0, _sum_combine)
    tl.store(out_ptr + row * stride_ot + head * stride_oh + offs_d * stride_od, merged.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


# ---- launch ----------------------------------------------------------------------------------------------------


class AttentionKernelConfig(NamedTuple):
    block_m: int  # rows per program: query tokens x the G heads of one KV head, >= 16 (tl.dot) and >= G
    block_n: int  # key tokens per tile
    num_warps: int = 4
    num_stages: int = 2
    keys_d_major: bool = False  # load key tiles as [head_dim, BLOCK_N] instead of transposing [BLOCK_N, head_dim]


def decode_config(group: int, head_dim: int, quantized: bool = False) -> AttentionKernelConfig:
    """One query token: rows = the G heads (padded to 16), SGLang's grouped-decode shape. Three pipeline stages:
    on an H100 at 32K x 64 x 8 KV heads x 128 they took BLOCK_N 64 from 78% to 90% of HBM bandwidth at GQA 4
    (bench/results/gpu-h100-20261127). One-byte codes take key tiles twice as long, loaded head_dim-major: there an
    fp8 cache ran in 2.38 ms at BLOCK_N 128 with d-major keys, 2.69-2.71 ms with transposed ones and 3.3 ms at 64
    (bench/results/gpu-h100-20261127-kvquant-dmajor); bf16 gains nothing from either."""
    block_m = max(16, triton.next_power_of_2(group))
    wide = block_m * triton.next_power_of_2(head_dim) > 16 * 128  # fp32 accumulator past 16 x 128: more warps
    block_n = 32 if wide else 128 if quantized else 64
    return AttentionKernelConfig(block_m, block_n, num_warps=8 if wide else 4, num_stages=3, keys_d_major=quantized)


def prefill_config(group: int, head_dim: int) -> AttentionKernelConfig:
    block_m = max(64, triton.next_power_of_2(group))
    wide = block_m * triton.next_power_of_2(head_dim) > 64 * 128
    return AttentionKernelConfig(block_m, 32 if wide else 64, num_warps=8 if wide else 4)


def num_kv_splits(num_programs: int, num_key_tiles: int, num_sms: int, max_splits: int = 128) -> int:
    """FlashAttention-2's split heuristic: no split when the programs nearly fill the SMs; otherwise the
    fewest splits whose wave efficiency is within 85% of the best, counting only split counts that change the
    tiles per split."""
    if num_programs >= 0.8 * num_sms:
        return 1
    limit = max(1, min(max_splits, num_sms, num_key_tiles))

    def eligible(s: int) -> bool:
        return s == 1 or -(-num_key_tiles // s) != -(-num_key_tiles // (s - 1))

    def efficiency(s: int) -> float:
        waves = num_programs * s / num_sms
        return waves / -(-waves // 1)

    best = max(efficiency(s) for s in range(1, limit + 1) if eligible(s))
    return next(s for s in range(1, limit + 1) if eligible(s) and efficiency(s) >= 0.85 * best)


def decode_num_splits(num_seqs: int, kv_cache: torch.Tensor, block_tables: torch.Tensor, block_n: int) -> int:
    """num_kv_splits for a decode batch, block_tables' width standing for the longest sequence (no host sync)."""
    key_tiles = triton.cdiv(block_tables.shape[-1] * kv_cache.shape[3], block_n)
    # The interpreter runs programs one after another: splitting keys never pays off there.
    device = kv_cache.device
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return num_kv_splits(num_seqs * kv_cache.shape[1], key_tiles, num_sms)


def _kv_quant(q: torch.Tensor, kv_cache: torch.Tensor, kv_scale: torch.Tensor | None) -> int:
    """KV_QUANT for the cache: full precision (q's dtype), int8 codes or fp8_e4m3 codes held as uint8, with scales."""
    if kv_cache.dtype in (torch.int8, torch.uint8):
        if kv_scale is None or kv_scale.shape != (*kv_cache.shape[:4], 1):
            raise ValueError(f"a quantized kv_cache ({kv_cache.dtype}) needs kv_scale of shape "
                             f"{(*kv_cache.shape[:4], 1)}, got {None if kv_scale is None else tuple(kv_scale.shape)}")
        return (KV_INT8 if kv_cache.dtype == torch.int8 else KV_FP8).value
    if kv_scale is not None:
        raise ValueError(f"kv_scale goes with int8 / uint8 (fp8_e4m3) codes, not a {kv_cache.dtype} kv_cache")
    if q.dtype != kv_cache.dtype:
        raise ValueError(f"q dtype {q.dtype} differs from the kv_cache dtype {kv_cache.dtype}")
    return KV_FULL.value


def _check_inputs(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                  query_start_loc: torch.Tensor) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [tokens, heads, head_dim], got shape {tuple(q.shape)}")
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(f"kv_cache must be [2, kv_heads, num_blocks, block_size, head_dim], "
                         f"got shape {tuple(kv_cache.shape)}")
    if q.shape[2] != kv_cache.shape[4]:
        raise ValueError(f"q head_dim {q.shape[2]} differs from the kv_cache head_dim {kv_cache.shape[4]}")
    if q.shape[1] % kv_cache.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of kv heads ({kv_cache.shape[1]})")
    num_seqs = block_tables.shape[0]
    per_head = block_tables.dim() == 3  # an attention policy's tables: one per (sequence, KV head)
    lens_shape = (num_seqs, kv_cache.shape[1]) if per_head else (num_seqs,)
    if (block_tables.dim() not in (2, 3) or per_head and block_tables.shape[1] != kv_cache.shape[1]
            or seq_lens.shape != lens_shape or query_start_loc.shape != (num_seqs + 1,)):
        raise ValueError(f"need block_tables [seqs, max_blocks] (or [seqs, kv_heads, max_blocks]), seq_lens [seqs] "
                         f"(or [seqs, kv_heads]) and query_start_loc [seqs + 1]; got {tuple(block_tables.shape)}, "
                         f"{tuple(seq_lens.shape)}, {tuple(query_start_loc.shape)}")


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, max_query_len: int, scale: float, *, num_splits: int = 1,
                    out: torch.Tensor | None = None, config: AttentionKernelConfig | None = None,
                    kv_scale: torch.Tensor | None = None, page_log_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Each sequence s's new queries q[query_start_loc[s]:query_start_loc[s + 1]] ([T, heads, hd] overall) attend
    causally over its seq_lens[s] cached tokens (which include them) through block_tables[s]; returns [T, heads, hd]
    (written into `out` when given). max_query_len: the longest chunk, a host int so that nothing syncs.
    kv_cache in q's dtype, or int8 / fp8_e4m3 (as uint8) codes with kv_scale [2, kv_heads, blocks, block_size, 1].
    Per KV head (an attention policy's pages): block_tables [seqs, kv_heads, max_blocks], seq_lens [seqs, kv_heads]
    and page_log_weights [seqs, kv_heads, max_blocks] (fp32) or None."""
    _check_inputs(q, kv_cache, block_tables, seq_lens, query_start_loc)
    if block_tables.dim() == 2:  # every KV head reads the sequence's one table
        block_tables, seq_lens = block_tables[:, None, :], seq_lens[:, None]
    if page_log_weights is not None and page_log_weights.shape != block_tables.shape:
        raise ValueError(f"page_log_weights must be shaped like the per-head block_tables "
                         f"{tuple(block_tables.shape)}, got {tuple(page_log_weights.shape)}")
    page_weights = seq_lens if page_log_weights is None else page_log_weights.float()  # unused when None
    kv_quant = _kv_quant(q, kv_cache, kv_scale)
    kv_scale = kv_cache if kv_scale is None else kv_scale  # unused when full precision
    num_tokens, num_heads, head_dim = q.shape
    kv_heads, page = kv_cache.shape[1], kv_cache.shape[3]
    group = num_heads // kv_heads
    cfg = config or (decode_config(group, head_dim, kv_quant != KV_FULL.value) if max_query_len == 1 else
                     prefill_config(group, head_dim))
    if cfg.block_m < max(16, group):
        raise ValueError(f"block_m {cfg.block_m} must be >= 16 and >= the query group {group}")
    block_q = cfg.block_m // group
    out = torch.empty_like(q) if out is None else out
    if num_splits > 1:
        part_out = torch.empty(num_tokens, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(num_tokens, num_heads, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused
    grid = (block_tables.shape[0], triton.cdiv(max_query_len, block_q), kv_heads * num_splits)
    _paged_attention_kernel[grid](
        q, kv_cache, kv_scale, out, part_out, part_lse, block_tables, seq_lens, page_weights, query_start_loc,
        scale * _LOG2E,
        *q.stride(), *kv_cache.stride(), *kv_scale.stride()[:4], *out.stride(),
        block_tables.stride(0), block_tables.stride(1) if block_tables.shape[1] > 1 else 0,
        seq_lens.stride(0), seq_lens.stride(1) if seq_lens.shape[1] > 1 else 0,
        *(page_weights.stride()[:2] if page_log_weights is not None else (0, 0)),
        *part_out.stride()[:3], *part_lse.stride()[:2],
        GROUP=group, HEAD_DIM=head_dim, PAGE=page, NUM_SPLITS=num_splits,
        BLOCK_M=cfg.block_m, BLOCK_Q=block_q, BLOCK_N=cfg.block_n, BLOCK_D=triton.next_power_of_2(head_dim),
        KV_QUANT=kv_quant, KEYS_D_MAJOR=cfg.keys_d_major, PAGE_WEIGHTS=page_log_weights is not None,
        DOT_FP32=q.dtype == torch.float32 or triton.knobs.runtime.interpret,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if num_splits > 1:
        _merge_splits_kernel[(num_tokens, num_heads)](
            part_out, part_lse, out, *part_out.stride()[:3], *part_lse.stride()[:2], *out.stride(),
            HEAD_DIM=head_dim, NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits),
            BLOCK_D=triton.next_power_of_2(head_dim))
    return out


def paged_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                 scale: float, *, num_splits: int | None = None, out: torch.Tensor | None = None,
                 config: AttentionKernelConfig | None = None, kv_scale: torch.Tensor | None = None,
                 page_log_weights: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per sequence, q [B, heads, hd], split-K over its keys; num_splits None: chosen from the
    SM count (num_kv_splits) with block_tables' width as the longest sequence. Tables per KV head as in
    paged_attention."""
    num_seqs, num_heads, head_dim = q.shape
    cfg = config or decode_config(num_heads // kv_cache.shape[1], head_dim, kv_scale is not None)
    if num_splits is None:
        num_splits = decode_num_splits(num_seqs, kv_cache, block_tables, cfg.block_n)
    query_start_loc = torch.arange(num_seqs + 1, dtype=torch.int32, device=q.device)
    return paged_attention(q, kv_cache, block_tables, seq_lens, query_start_loc, 1, scale,
                           num_splits=num_splits, out=out, config=cfg, kv_scale=kv_scale,
                           page_log_weights=page_log_weights)


class TritonPagedAttention:
    """The attention backend interface on the Triton kernels (same call as TorchPagedAttention)."""
    name = "triton"

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                 meta: AttentionMetadata, scale: float, layer: int) -> torch.Tensor:
        store_kv(kv_cache, k, v, meta)  # all K/V first, as in TorchPagedAttention
        if meta.sparse is not None:
            meta.sparse.on_write(layer, k, meta.slot_mapping)
        segments = meta.decode_segments(layer, q, kv_cache, scale)  # before the rotation below: policies see q as is
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        # A token-format QuantizedKVCache is read in place: codes and scales, dequantized in the kernel.
        codes, kv_scale = kv_cache, None
        if not isinstance(kv_cache, torch.Tensor):
            codes, kv_scale, q = kv_cache.kernel_operands(q)
        nd, device = meta.num_decodes, q.device
        if nd and meta.decode_seq_lens is None:
            raise ValueError("the Triton backend needs AttentionMetadata.decode_seq_lens")
        for start, stop, chosen in segments:
            rows = slice(start, stop)
            if chosen is None:
                paged_decode(q[rows], codes, meta.decode_block_tables[rows].to(device),
                             meta.decode_seq_lens[rows].to(device), scale, out=out[rows], kv_scale=kv_scale)
            else:
                weights = None if chosen.log_weights is None else chosen.log_weights.to(device)
                paged_decode(q[rows], codes, chosen.block_tables.to(device), chosen.seq_lens.to(device), scale,
                             out=out[rows], kv_scale=kv_scale, page_log_weights=weights)
        if meta.dense_prefills:
            batch = meta.prefill_batch
            paged_attention(q[nd:], codes, batch.block_tables.to(device), batch.seq_lens.to(device),
                            batch.query_start_loc.to(device), batch.max_query_len, scale, out=out[nd:],
                            kv_scale=kv_scale)
        for seq in meta.prefills:  # a policy's own prefill (plain torch; policies run on unquantized caches only)
            if seq.policy is not None:
                rows = slice(seq.token_start, seq.token_start + seq.num_tokens)
                out[rows] = policy_prefill(seq, q[rows], kv_cache, scale, layer)
        return out
