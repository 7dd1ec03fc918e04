"""The naive MoE reference: one (token, slot) at a time, straight from the math. For tests only.

    out[t] = sum_j topk_weights[t, j] * w2[e] @ (silu(w13[e, :I] @ x[t]) * (w13[e, I:] @ x[t])),  e = topk_ids[t, j]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def moe_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                  topk_weights: torch.Tensor) -> torch.Tensor:
    """x [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_ids / topk_weights [T, k] -> [T, H] in x's dtype (fp32 sums)."""
    inter = w13.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            xt = x[t].float()
            gate = w13[e, :inter].float() @ xt
            up = w13[e, inter:].float() @ xt
            out[t] += float(topk_weights[t, j]) * (w2[e].float() @ (F.silu(gate) * up))
    return out.to(x.dtype)
