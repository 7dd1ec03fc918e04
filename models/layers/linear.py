"""nn.Linear whose weight is prepared for the CPU after loading: prepacked for oneDNN (kernels/cpu_linear.py), or
quantized (kernels/quant_linear.py, --quantization): int8 codes with one scale per output channel, or int4 codes
with a scale and zero per group of 32 input channels."""
from __future__ import annotations

import torch
from torch import nn

from afdserve.kernels.cpu_linear import can_prepack, linear, prepack
from afdserve.kernels.quant_linear import quantize_weight, quantized_linear


class Linear(nn.Linear):
    packed_weight: torch.Tensor | None = None
    quantization: str | None = None  # "int8" / "int4" / "fp8": `weight` holds the codes, `weight_scale` their scales
    quantizable = True  # False: --quantization leaves this layer in the model dtype (MoE router gates)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_parameter("weight_scale", None)

    def prepare_for_inference(self, quantization: str | None = None) -> None:
        """Called once after the weights are loaded, cast and moved (and, for int8, before FFN sharding)."""
        if quantization is not None and self.quantizable:
            codes, scales = quantize_weight(self.weight, quantization)
            self.weight = nn.Parameter(codes, requires_grad=False)
            self.weight_scale = nn.Parameter(scales, requires_grad=False)
            self.quantization, self.packed_weight = quantization, None
            return
        self.packed_weight = prepack(self.weight) if can_prepack(self.weight) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantization is not None:
            return quantized_linear(x, self.quantization, self.weight, self.weight_scale, self.bias)
        return linear(x, self.weight, self.bias, self.packed_weight)
