"""MoE expert compute as two Triton grouped GEMMs over block-aligned token copies (the CUDA path).

    topk_ids [T, k] ──moe_align_block_size──► sorted_token_ids [max_padded]: the T*k flat (token, slot) copies
        grouped by expert, each expert's segment padded up to a multiple of BLOCK_M with the sentinel T*k;
        expert_ids [num_blocks]: the expert of each BLOCK_M block;  num_tokens_post_padded [1] (a device tensor)
    GEMM1  gate_up[copy] = x[copy // k] @ w13[e]^T              [T*k, 2I]  in x's dtype
    act    = silu(gate_up[:, :I]) * gate_up[:, I:]               [T*k, I]   (torch, fp32 math)
    GEMM2  down[copy]    = topk_weight[copy] * act[copy] @ w2[e]^T   [T*k, H]  fp32
    combine: out[t] = sum_j down[t*k + j]                        fp32, then cast to x's dtype

One program per (block of BLOCK_M sorted copies, block of BLOCK_N output columns): it reads its block's expert, gathers
its A rows through sorted_token_ids, runs fp32-accumulated tl.dot over K in BLOCK_K steps, and scatters rows back to
their flat copy index; padding rows (sentinel) are masked on load and store. The grid is sized from the static upper
bound T*k + E*(BLOCK_M-1), and blocks past num_tokens_post_padded exit at once, so nothing is read on the host.
fp32 inputs multiply in IEEE fp32 (no TF32). Under TRITON_INTERPRET the operands are upcast to fp32 before tl.dot,
because the interpreter (3.9) multiplies bf16 as its raw uint16 bits; bf16 products are exact in fp32, so the
result is the tensor-core one up to summation order. The kernel calls no @jit helper of Triton's standard library
(tl.cdiv, tl.zeros): the interpreter runs those only if triton itself was imported under TRITON_INTERPRET.

This is the layout of vLLM's fused_moe without its GROUP_SIZE_M swizzle or tuned
configs. Same contract as kernels/moe/torch_moe.fused_experts_torch.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from afdserve.kernels.moe.torch_moe import fused_experts_torch


class BlockAlignment(NamedTuple):
    sorted_token_ids: torch.Tensor  # [T*k + E*(block_size-1)] int32 flat copy ids, padding = T*k
    expert_ids: torch.Tensor  # [cdiv(len(sorted_token_ids), block_size)] int32, the expert of each block
    num_tokens_post_padded: torch.Tensor  # [1] int32, sum over experts of counts rounded up to block_size
    tokens_per_expert: torch.Tensor  # [E] int64


def moe_align_block_size(topk_ids: torch.Tensor, block_size: int, num_experts: int) -> BlockAlignment:
    """Plain torch, no host sync: stable sort of the flat copies by expert, scattered into padded segments."""
    flat = topk_ids.reshape(-1)
    num_copies = flat.numel()
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_size - 1) // block_size * block_size
    padded_end = torch.cumsum(padded, 0)
    order = torch.sort(flat, stable=True).indices
    sorted_experts = flat[order]
    rank = torch.arange(num_copies, device=flat.device) - (torch.cumsum(counts, 0) - counts)[sorted_experts]
    dest = (padded_end - padded)[sorted_experts] + rank
    max_len = num_copies + num_experts * (block_size - 1)
    sorted_token_ids = torch.full((max_len,), num_copies, dtype=torch.int32, device=flat.device)
    sorted_token_ids[dest] = order.to(torch.int32)
    block_starts = torch.arange(0, max_len, block_size, device=flat.device)
    expert_ids = torch.searchsorted(padded_end, block_starts, right=True).clamp_(max=num_experts - 1)
    return BlockAlignment(sorted_token_ids, expert_ids.to(torch.int32), padded_end[-1:].to(torch.int32), counts)


@triton.jit
def _grouped_gemm_kernel(a_ptr, b_ptr, c_ptr, weight_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_padded_ptr,
                         N, K, num_copies, a_row_div,
                         stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
                         MUL_WEIGHT: tl.constexpr, DOT_FP32: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C[copy, :] = (weight[copy] *) A[copy // a_row_div, :] @ B[expert of block]^T for the block's copies."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_post_padded_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    copy = tl.load(sorted_ids_ptr + offs_m)
    row_mask = copy < num_copies
    a_rows = tl.where(row_mask, copy // a_row_div, 0)
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for k0 in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        k_mask = offs_k < K - k0 * BLOCK_K
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & (offs_n[None, :] < N), other=0.0)
        if DOT_FP32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if MUL_WEIGHT:
        acc = acc * tl.load(weight_ptr + copy, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    c_ptrs = c_ptr + copy[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & (offs_n[None, :] < N))


class MoEBlockConfig(NamedTuple):
    block_m: int = 64
    block_n: int = 64
    block_k: int = 32
    num_warps: int = 4
    num_stages: int = 2


def default_config(num_copies: int, num_experts: int) -> MoEBlockConfig:
    """Batch-size aware tiles: small BLOCK_M for decode, where most rows would be padding, growing with the copies
    per expert. Each step is the best of the H100 sweep for a Mixtral-sized layer (E=8, k=2, H=4096, I=14336, bf16;
    bench/results/gpu-h100-20261127-moe-sweep): T=16 1.73 -> 1.44 ms, T=64 1.84 -> 1.50 ms, T=4096 10.7 -> 8.2 ms."""
    per_expert = num_copies / num_experts
    if per_expert <= 4:
        return MoEBlockConfig(block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=3)
    if per_expert <= 16:
        return MoEBlockConfig(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3)
    if per_expert <= 64:
        return MoEBlockConfig(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=3)
    return MoEBlockConfig(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3)


def _grouped_gemm(a, b, c, align: BlockAlignment, a_row_div: int, cfg: MoEBlockConfig,
                  weights: torch.Tensor | None = None) -> None:
    """c[copy] = (weights[copy] *) a[copy // a_row_div] @ b[e]^T over every block of `align`; b is [E, N, K]."""
    n, k = b.shape[1], b.shape[2]
    grid = (align.expert_ids.numel(), triton.cdiv(n, cfg.block_n))
    _grouped_gemm_kernel[grid](
        a, b, c, weights if weights is not None else c, align.sorted_token_ids, align.expert_ids,
        align.num_tokens_post_padded, n, k, c.shape[0], a_row_div,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
        MUL_WEIGHT=weights is not None, DOT_FP32=a.dtype == torch.float32 or triton.knobs.runtime.interpret,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def fused_experts_triton(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                         topk_weights: torch.Tensor, config: MoEBlockConfig | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] -> (out [T, H] in x's dtype, tokens_per_expert [E]); see the module docstring."""
    num_tokens, top_k = topk_ids.shape
    num_experts, inter = w13.shape[0], w13.shape[1] // 2
    num_copies = num_tokens * top_k
    cfg = config or default_config(num_copies, num_experts)
    align = moe_align_block_size(topk_ids, cfg.block_m, num_experts)
    gate_up = torch.empty(num_copies, 2 * inter, dtype=x.dtype, device=x.device)
    _grouped_gemm(x, w13, gate_up, align, top_k, cfg)
    gate, up = gate_up.float().chunk(2, dim=-1)
    act = (F.silu(gate) * up).to(x.dtype)
    down = torch.empty(num_copies, x.shape[1], dtype=torch.float32, device=x.device)
    _grouped_gemm(act, w2, down, align, 1, cfg, weights=topk_weights.reshape(-1).contiguous())
    out = down.view(num_tokens, top_k, -1).sum(dim=1)
    return out.to(x.dtype), align.tokens_per_expert


# Above this many routed copies per expert, the torch path's per-expert cuBLAS GEMMs beat the grouped GEMM above on
# an H100 (Mixtral-sized layer, k=2: T=256, 64 per expert, Triton 2.05 ms vs torch 2.46; T=1024, 256 per expert,
# 3.03 vs 2.17; bench/results/gpu-h100-20261127-moe-defaults).
TORCH_ABOVE_COPIES_PER_EXPERT = 128


def fused_experts_cuda(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                       topk_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The CUDA path, chosen per call by batch size: the Triton grouped GEMM for decode-sized batches, the torch path
    past TORCH_ABOVE_COPIES_PER_EXPERT routed copies per expert."""
    if topk_ids.numel() > TORCH_ABOVE_COPIES_PER_EXPERT * w13.shape[0]:
        return fused_experts_torch(x, w13, w2, topk_ids, topk_weights)
    return fused_experts_triton(x, w13, w2, topk_ids, topk_weights)
