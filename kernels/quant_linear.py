"""Quantized linears: weight-only int8 and int4 for CPU decoding, and FP8 (W8A8) for Hopper.

Weight-only int8 linears for CPU decoding, where a small batch's step is bound by reading the weights.

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

fp8 (`--quantization fp8`): weights in float8_e4m3fn with one fp32 scale per output channel, activations quantized
per token at run time, the product on the FP8 tensor cores through `torch._scaled_mm` (vLLM's dynamic fp8; Step-3
and DeepSeek-V3 serve in FP8). Not a CPU speed path: it runs on a CPU (oneDNN) so that its accuracy is tested there.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

INT8_MAX = 127
INT4_GROUP = 32
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
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


def quantize_fp8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes float8_e4m3fn [N, K], scales fp32 [N]): w ~ codes * s with s = max|W[n, :]| / 448 (e4m3's largest
    finite value). A channel of zeros gets scale 1."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (w / scales[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).contiguous(), scales


def dequantize_fp8_blocks(codes: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """A block-scaled fp8 checkpoint weight (DeepSeek-V3's format) in fp32: codes float8_e4m3fn [N, K] times the
    scale of their block, scale_inv fp32 [ceil(N / rows), ceil(K / cols)] for block (rows, cols); the last blocks
    of a row or column may be partial. (The checkpoint calls the multiplier `weight_scale_inv`: the inverse of the
    quantizer's scale.)"""
    rows, cols = block
    n, k = codes.shape
    grid = (-(-n // rows), -(-k // cols))
    if scale_inv.shape != grid:
        raise ValueError(f"fp8 weight of shape {tuple(codes.shape)} with blocks of {rows} x {cols} needs "
                         f"{grid[0]} x {grid[1]} scales, got {tuple(scale_inv.shape)}")
    per_value = scale_inv.float().repeat_interleave(rows, 0)[:n].repeat_interleave(cols, 1)[:, :k]
    return codes.float() * per_value


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation scales, one per row of x [T, K]: (codes float8_e4m3fn [T, K], scales fp32 [T, 1]). Also
    the FP8 A->F wire format (cluster/wire.py)."""
    rows = x.float()
    scales = (rows.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_min(_TINY_SCALE)
    return (rows / scales).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scales


def fp8_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] times the fp8 weight, both sides in e4m3 (W8A8 as Step-3 and DeepSeek-V3 deploy it): each row of x
    quantized with its own scale, one `torch._scaled_mm` with the row and channel scales applied to its fp32 sum
    (Hopper's FP8 tensor cores; on a CPU, oneDNN). [..., N] in x's dtype, the bias added in it."""
    rows = x.reshape(-1, x.shape[-1])
    x_codes, x_scales = quantize_fp8_per_token(rows)
    out = torch._scaled_mm(x_codes, codes.t(), scale_a=x_scales, scale_b=scales[None, :],
                           out_dtype=x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32)
    out = out.to(x.dtype)
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], codes.shape[0])


def fp8_linear_reference(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                         bias: torch.Tensor | None) -> torch.Tensor:
    """The same product from the same codes, dequantized first and multiplied in fp64."""
    x_codes, x_scales = quantize_fp8_per_token(x.reshape(-1, x.shape[-1]))
    out = (x_codes.double() * x_scales.double()) @ (codes.double() * scales.double()[:, None]).t()
    out = out.to(x.dtype)
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], codes.shape[0])


def quantize_weight(weight: torch.Tensor, quantization: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) of `weight` for --quantization int8, int4 or fp8."""
    if quantization == "int8":
        return quantize_int8_per_channel(weight)
    if quantization == "int4":
        return quantize_int4_grouped(weight)
    if quantization == "fp8":
        return quantize_fp8_per_channel(weight)
    raise ValueError(f"unknown weight quantization {quantization!r}")


def quantized_linear(x: torch.Tensor, quantization: str, codes: torch.Tensor, scales: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    linear = {"int8": int8_linear, "int4": int4_linear, "fp8": fp8_linear}[quantization]
    return linear(x, codes, scales, bias)
