"""nn.Linear whose weight may be prepacked for the CPU backend after loading (see kernels/cpu_linear.py)."""
from __future__ import annotations

import torch
from torch import nn

from afdserve.kernels.cpu_linear import can_prepack, linear, prepack


class Linear(nn.Linear):
    packed_weight: torch.Tensor | None = None

    def prepare_for_inference(self) -> None:
        """Called once after the weights are loaded and cast."""
        self.packed_weight = prepack(self.weight) if can_prepack(self.weight) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed_weight)
