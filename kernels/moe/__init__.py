"""MoE expert compute: routing result -> token permutation (sorted by expert) -> per-expert gate_up / SiLU*mul / down
-> weighted combine. `torch_moe` is the CPU path; `triton_moe` the CUDA path (block-aligned grouped GEMMs, same
contract); `reference` is the naive per-token loop every path is tested against. `select_moe_impl` picks one per
device type; triton_moe is imported only when chosen, so CPU runs never import Triton."""
import functools
import importlib.util
from typing import Callable

import torch

from afdserve.kernels.moe.reference import moe_reference
from afdserve.kernels.moe.torch_moe import ExpertPermutation, fused_experts_torch, permute_by_expert

ExpertsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                     tuple[torch.Tensor, torch.Tensor]]


@functools.lru_cache(maxsize=None)
def select_moe_impl(device_type: str) -> ExpertsFn:
    """On "cuda" with Triton installed, fused_experts_cuda (the Triton grouped GEMM, or the torch path for large
    batches); else fused_experts_torch. Each takes (x, w13, w2, ids, weights)."""
    if device_type == "cuda" and importlib.util.find_spec("triton") is not None:
        from afdserve.kernels.moe.triton_moe import fused_experts_cuda
        return fused_experts_cuda
    return fused_experts_torch


__all__ = ["ExpertPermutation", "ExpertsFn", "fused_experts_torch", "moe_reference", "permute_by_expert",
           "select_moe_impl"]
