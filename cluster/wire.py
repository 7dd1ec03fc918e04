"""How an FFN input travels from an attention worker to an FFN worker: the A->F activation message.

    auto  the hidden states in the model dtype
    fp8   e4m3 codes with one fp32 scale per token (kernels/quant_linear.quantize_fp8_per_token): 1 + 4 / hidden
          bytes a value, half of bf16's; Step-3 (arXiv:2507.19427) sends its A->F activations in FP8
The FFN output going back (F->A) stays in the model dtype; so do the routing ids and weights.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from afdserve.engine.config import AFD_WIRES
from afdserve.kernels.quant_linear import quantize_fp8_per_token


class ActivationWire:
    def __init__(self, kind: str = "auto"):
        if kind not in AFD_WIRES:
            raise ValueError(f"afd_wire must be one of {', '.join(AFD_WIRES)}, got {kind!r}")
        self.kind = kind

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The messages that carry x [T, hidden], in the order `decode` reads them."""
        if self.kind == "fp8":
            return list(quantize_fp8_per_token(x))
        return [x]

    def decode(self, recv: Callable[[tuple[int, ...], torch.dtype], torch.Tensor], rows: int, hidden: int,
               dtype: torch.dtype) -> torch.Tensor:
        """The FFN input [rows, hidden] in `dtype`, from `recv(shape, dtype)`, which reads the next message."""
        if self.kind == "fp8":
            codes = recv((rows, hidden), torch.float8_e4m3fn)
            scales = recv((rows, 1), torch.float32)
            return (codes.float() * scales).to(dtype)
        return recv((rows, hidden), dtype)
