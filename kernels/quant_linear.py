"""Weight-only int8 linears for CPU decoding, where a small batch's step is bound by reading the weights.

Each output channel n of a weight W[N, K] is stored as int8 codes q[n, :] = round(W[n, :] / s[n]) with one scale
s[n] = max|W[n, :]| / 127 (symmetric, per channel: the LLM.int8() / SmoothQuant weight format without outlier
handling). The product is y = (x @ q^T) * s: the scale comes out of the sum over K, so the kernel reads int8 codes
and never materializes W. `int8_linear` runs torch's fused CPU kernel (the one gpt-fast uses for int8 weight-only
on CPU) with bf16 activations, whatever the model dtype: the kernel is vectorized for bf16 and fp16 inputs only, and
fp32 inputs take a scalar path (measured on an AVX2-only EPYC, 2 threads, [1, 576] x [3072, 576]: 0.09 ms with bf16
activations, 0.99 ms with fp32, 0.26 ms for the fp32 F.linear). It pays at small batches, where reading the
weights bounds the step; at 32 rows it took twice the fp32 F.linear's time. `int8_linear_reference` dequantizes
and calls F.linear on the same bf16-rounded input, for the tests.

int4 (`--quantization int4`): llama.cpp's Q4_1 layout in torch's CPU int4 kernel. Each group of INT4_GROUP = 32
input channels of an output channel gets an asymmetric min/max code q in [0, 15] with a scale s = (max - min) / 15
and a zero z = min + 8 s, both bf16, and w ~ (q - 8) s + z, which is how `_weight_int4pack_mm_for_cpu` dequantizes
(0.625 bytes a weight with the scales). Measured on a 2-core AMD EPYC with AVX-512 BF16, 64 linears of [1536, 576]:
batch 1 takes 1.9 ms in int4 against 3.9 ms in int8 and 4.9 ms prepacked bf16; at 32 rows int4 takes 22 ms against
12 ms bf16 (int8 32 ms), so it is a small-batch format.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

INT8_MAX = 127
INT4_GROUP = 32
_TINY_SCALE = 2.0 ** -24  # a group of equal weights: any scale, codes 0 and the zero carries the value


def quantize_int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 [N, K], scales [N] in the weight's dtype). A channel of zeros gets scale 1 (codes stay 0)."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    codes = (w / scales[:, None]).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes.contiguous(), scales.to(weight.dtype)


def activation_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the int8 kernel reads activations in: x's if half precision, else bf16 (see the module doc)."""
    return x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def _weight_only_product(x: torch.Tensor, out_features: int, bias: torch.Tensor | None, kernel) -> torch.Tensor:
    """x [..., K] (fp32, bf16 or fp16) as contiguous rows in the activation dtype through `kernel(rows, compute
    dtype) -> [rows, N]`; the result in x's dtype and leading shape, the bias added in it."""
    compute = activation_dtype(x)
    rows = x.reshape(-1, x.shape[-1]).to(compute).contiguous()
    out = kernel(rows, compute).to(x.dtype)
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], out_features)


def int8_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] (fp32, bf16 or fp16) times the int8 weight: [..., N] in x's dtype; the bias added in it."""
    return _weight_only_product(x, codes.shape[0], bias,
                                lambda rows, compute: torch._weight_int8pack_mm(rows, codes, scales.to(compute)))


def int8_linear_reference(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                          bias: torch.Tensor | None) -> torch.Tensor:
    """The same product with the weight dequantized first, from the same rounded input, in fp32; the result rounded
    to the activation dtype as the kernel's is."""
    weight = codes.float() * scales.to(activation_dtype(x)).float()[:, None]
    rows = x.to(activation_dtype(x)).float()
    out = F.linear(rows, weight).to(activation_dtype(x)).to(x.dtype)
    return out if bias is None else out + bias


def quantize_int4_grouped(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed codes uint8 [N, K / 2] in the kernel's layout, scales_and_zeros bf16 [K / INT4_GROUP, N, 2])."""
    w = weight.detach().float()
    n, k = w.shape
    if k % INT4_GROUP:
        raise ValueError(f"int4 quantizes groups of {INT4_GROUP} input channels; this linear has {k}")
    groups = w.view(n, k // INT4_GROUP, INT4_GROUP)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(_TINY_SCALE)
    codes = ((groups - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).view(n, k)
    packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    scales_and_zeros = torch.stack([scale.t(), (lo + 8 * scale).t()], dim=-1).to(torch.bfloat16).contiguous()
    return packed, scales_and_zeros


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] times the int4 weight: [..., N] in x's dtype, the activations read in bf16 (as int8_linear)."""
    return _weight_only_product(x, packed.shape[0], bias, lambda rows, compute: torch._weight_int4pack_mm_for_cpu(
        rows, packed, INT4_GROUP, scales_and_zeros.to(compute)))


def quantize_weight(weight: torch.Tensor, quantization: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) of `weight` for --quantization int8 or int4."""
    if quantization == "int8":
        return quantize_int8_per_channel(weight)
    if quantization == "int4":
        return quantize_int4_grouped(weight)
    raise ValueError(f"unknown weight quantization {quantization!r}")


def quantized_linear(x: torch.Tensor, quantization: str, codes: torch.Tensor, scales: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    linear = int8_linear if quantization == "int8" else int4_linear
    return linear(x, codes, scales, bias)
