"""Linear layers on CPU through oneDNN with the weight reordered once at load time.

`F.linear` on a bf16/fp16 CPU tensor runs the same oneDNN kernel but reorders the weight into its blocked layout on
every call; prepacking removes that (measured on the 2-core dev machine: ~35% less time per linear at batch 1 and
32, bitwise-identical outputs). fp32 stays on F.linear (MKL), the path the transformers oracle uses.
oneDNN packs bf16 / fp16 weights only on CPUs with the matching instructions (AVX-512 BW/VL/DQ, AVX-NE-CONVERT or
AMX); on others (an AVX2-only host) the weights stay unpacked and F.linear runs them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_PACK_BATCH_HINT = 32  # oneDNN picks its blocking for this many rows; it still accepts any row count


def onednn_runs_natively(dtype: torch.dtype) -> bool:
    """Whether this CPU has instructions for oneDNN's `dtype` kernels (bf16: AVX-512 BW/VL/DQ or AMX; fp16: AVX-512
    FP16, AVX-NE-CONVERT or AMX). fp32 always; without them bf16 / fp16 fall back to slow conversions."""
    if dtype == torch.float32:
        return True
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if dtype == torch.float16:
        return torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return False


def can_prepack(weight: torch.Tensor) -> bool:
    if weight.device.type != "cpu" or weight.dtype == torch.float32:
        return False
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    return onednn_runs_natively(weight.dtype)


def prepack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_BATCH_HINT)


def packed_linear(x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           packed_weight: torch.Tensor | None) -> torch.Tensor:
    if packed_weight is not None:
        return packed_linear(x, packed_weight, bias)
    return F.linear(x, weight, bias)
