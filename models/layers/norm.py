from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, optionally fused with the residual add that precedes it."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is not None:
            x = residual + x
            residual = x
        # fp32 normalization, then the weight in the model dtype: transformers' order of rounding. The fused
        # kernel is bitwise-equal to x * rsqrt(mean(x^2) + eps) here and half the ops.
        out = self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return out if residual is None else (out, residual)
