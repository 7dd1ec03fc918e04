"""nn.Linear whose weight is prepared for the CPU after loading: prepacked for oneDNN (kernels/cpu_linear.py), or
quantized to int8 codes with one scale per output channel (kernels/quant_linear.py, --quantization int8)."""
from __future__ import annotations

import torch
from torch import nn

from afdserve.kernels.cpu_linear import can_prepack, linear, prepack
from afdserve.kernels.quant_linear import int8_linear, quantize_int8_per_channel


class Linear(nn.Linear):
    packed_weight: torch.Tensor | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_parameter("weight_scale", None)  # int8: `weight` holds the codes, this a scale per output row

    def prepare_for_inference(self, quantization: str | None = None) -> None:
        """Called once after the weights are loaded, cast, moved and sharded."""
        if quantization == "int8":
            codes, scales = quantize_int8_per_channel(self.weight)
            self.weight = nn.Parameter(codes, requires_grad=False)
            self.weight_scale = nn.Parameter(scales, requires_grad=False)
            self.packed_weight = None
            return
        self.packed_weight = prepack(self.weight) if can_prepack(self.weight) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_scale is not None:
            return int8_linear(x, self.weight, self.weight_scale, self.bias)
        return linear(x, self.weight, self.bias, self.packed_weight)
