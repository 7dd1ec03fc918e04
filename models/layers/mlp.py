"""The gated (SwiGLU) MLP: down(silu(gate(x)) * up(x)), with gate and up fused into one linear.

Sharding (AFD with several FFN workers): the MLP is a sum over its intermediate dimension, so world workers that
each keep one slice [lo, hi) of it (gate and up rows, down columns) return partial outputs that sum to the whole.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from afdserve.models.layers.linear import Linear

PER_CHANNEL = ("int8", "fp8")  # quantizations with one scale per output channel, which row / column slices keep


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)

    def shard_(self, rank: int, world: int) -> None:
        """Keeps the intermediate slice of `rank` out of `world`, in place; its output becomes a partial sum.

        An int8 or fp8 layer keeps its codes and per-output-channel scales: gate and up rows take their rows'
        scales, down's column slice keeps every scale, so a shard computes exactly its part of the unsharded product
        (for fp8 up to the per-token activation scale, which a shard takes from its own columns)."""
        quantization = self.down_proj.quantization
        if quantization not in (None, *PER_CHANNEL):
            raise ValueError(f"an FFN shard keeps full-precision, int8 or fp8 linears; {quantization}'s packed groups "
                             f"are not split")
        lo, hi = shard_range(self.down_proj.in_features, rank, world)
        gate, up = self.gate_up_proj.weight.detach().chunk(2)
        scale = self.gate_up_proj.weight_scale
        if scale is not None:
            gate_scale, up_scale = scale.detach().chunk(2)
            scale = torch.cat([gate_scale[lo:hi], up_scale[lo:hi]])
        self.gate_up_proj = _linear_from(torch.cat([gate[lo:hi], up[lo:hi]]), scale, quantization)
        self.down_proj = _linear_from(self.down_proj.weight.detach()[:, lo:hi].contiguous(),
                                      self.down_proj.weight_scale, quantization)


def shard_range(size: int, rank: int, world: int) -> tuple[int, int]:
    """The [lo, hi) part of `size` items that `rank` of `world` holds: contiguous and as equal as possible."""
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    if size < world:
        raise ValueError(f"cannot split {size} items over {world} workers")
    return rank * size // world, (rank + 1) * size // world


def _linear_from(weight: torch.Tensor, scale: torch.Tensor | None = None, quantization: str | None = None) -> Linear:
    """A prepared Linear over `weight`, or over int8 / fp8 codes with their per-output-channel `scale`."""
    out_features, in_features = weight.shape
    linear = Linear(in_features, out_features, bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if scale is not None:
        linear.weight_scale = nn.Parameter(scale.detach(), requires_grad=False)
        linear.quantization = quantization
    else:
        linear.prepare_for_inference()
    return linear
