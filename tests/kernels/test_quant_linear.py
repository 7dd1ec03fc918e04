"""Weight-only int8 and int4 linears and the fp8 (W8A8) linear: the quantizers against their formulas, and the kernels
(torch's fused CPU kernels, torch._scaled_mm) against the dequantize-then-multiply references and against the
unquantized product."""
import pytest
import torch
import torch.nn.functional as F

from afdserve.kernels.quant_linear import (fp8_linear, fp8_linear_reference, int4_linear, int8_linear,
                                             int8_linear_reference, quantize_fp8_per_channel, quantize_fp8_per_token,
                                             quantize_int4_grouped, quantize_int8_per_channel)


def test_per_channel_codes_and_scales_follow_the_formula():
    w = torch.randn(48, 96) * torch.logspace(-3, 1, 48)[:, None]  # channels of very different ranges
    w[5] = 0  # an all-zero channel
    codes, scales = quantize_int8_per_channel(w)
    assert codes.dtype == torch.int8 and codes.shape == w.shape and scales.shape == (48,)
    amax = w.abs().amax(1)
    assert torch.equal(scales[amax > 0], (amax / 127)[amax > 0]) and scales[5] == 1 and not codes[5].any()
    assert codes.abs().amax(1)[amax > 0].eq(127).all()  # each channel's largest weight uses the full range
    dequant = codes.float() * scales[:, None]
    assert ((dequant - w).abs() <= scales[:, None] / 2 + 1e-7).all()  # within half a step


@pytest.mark.parametrize("rows", [1, 7, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernel_equals_the_dequantized_reference(rows, dtype):
    torch.manual_seed(0)
    w, bias = torch.randn(160, 64), torch.randn(160)
    x = torch.randn(rows, 64).to(dtype)
    codes, scales = quantize_int8_per_channel(w.to(dtype))
    got = int8_linear(x, codes, scales, bias.to(dtype))
    ref = int8_linear_reference(x, codes, scales, bias.to(dtype))
    assert got.dtype == dtype and got.shape == (rows, 160)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), ref.float(), atol=tol * 8, rtol=tol)
    # And close to the unquantized layer: the error is the codes' rounding, ~1% of each output's scale.
    exact = F.linear(x.float(), w.to(dtype).float(), bias.to(dtype).float())
    assert (got.float() - exact).norm() / exact.norm() < 0.02


def test_leading_dimensions_and_a_strided_input_are_kept():
    codes, scales = quantize_int8_per_channel(torch.randn(24, 16))
    x = torch.randn(3, 5, 32)[..., ::2]  # [3, 5, 16], not contiguous
    out = int8_linear(x, codes, scales, None)
    assert out.shape == (3, 5, 24)
    torch.testing.assert_close(out, int8_linear_reference(x, codes, scales, None), atol=1e-4, rtol=1e-4)


# ---- int4: llama.cpp's Q4_1 per group of 32 input channels, in torch's CPU int4 kernel ----------------------------
def q4_1_dequantized(w: torch.Tensor, group: int = 32) -> torch.Tensor:
    """The formula, without the engine's code: per group, scale = (max - min) / 15, codes round((w - min) / scale)
    in [0, 15], and the weight (code - 8) * scale + (min + 8 * scale) with scale and zero rounded to bf16."""
    n, k = w.shape
    g = w.float().view(n, k // group, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = (hi - lo) / 15
    codes = ((g - lo) / scale).round().clamp(0, 15)
    scale_bf, zero_bf = scale.bfloat16().float(), (lo + 8 * scale).bfloat16().float()
    return ((codes - 8) * scale_bf + zero_bf).view(n, k)


@pytest.mark.parametrize("rows", [1, 7, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_kernel_equals_the_q4_1_formula(rows, dtype):
    torch.manual_seed(0)
    w, bias = torch.randn(96, 128) * torch.logspace(-2, 0, 96)[:, None], torch.randn(96)
    x = torch.randn(rows, 128).to(dtype)
    codes, scales = quantize_int4_grouped(w)
    assert codes.dtype == torch.uint8 and codes.numel() == w.numel() // 2 and scales.shape == (4, 96, 2)
    got = int4_linear(x, codes, scales, bias.to(dtype))
    ref = (F.linear(x.bfloat16().float(), q4_1_dequantized(w)).bfloat16().to(dtype) + bias.to(dtype)).float()
    assert got.dtype == dtype and got.shape == (rows, 96)
    torch.testing.assert_close(got.float(), ref, atol=1e-2, rtol=1e-2)  # equal here; a bf16 ulp of slack for order
    # And 4 bits' distance from the unquantized layer: ~8% of each output's norm for Gaussian weights.
    exact = F.linear(x.float(), w, bias.to(dtype).float())
    assert (got.float() - exact).norm() / exact.norm() < 0.15


def test_int4_needs_whole_groups():
    with pytest.raises(ValueError, match="groups of 32 input channels; this linear has 48"):
        quantize_int4_grouped(torch.randn(16, 48))


# e4m3: 3 mantissa bits, so rounding to nearest is within 2^-4 of a normal value; below 2^-6 (the smallest normal),
# steps are 2^-9 wide.
E4M3_REL, E4M3_SUBNORMAL_STEP = 2 ** -4, 2 ** -9


def test_fp8_codes_and_scales_follow_the_formula():
    w = torch.randn(48, 96) * torch.logspace(-3, 1, 48)[:, None]
    w[5] = 0
    codes, scales = quantize_fp8_per_channel(w)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == w.shape and scales.dtype == torch.float32
    amax = w.abs().amax(1)
    assert torch.equal(scales[amax > 0], (amax / 448)[amax > 0]) and scales[5] == 1 and not codes[5].float().any()
    assert codes.float().abs().amax(1)[amax > 0].eq(448).all()  # each channel's largest weight at e4m3's max
    scaled = w / scales[:, None]
    err = (codes.float() - scaled).abs()
    assert (err <= torch.maximum(E4M3_REL * scaled.abs(), torch.full_like(err, E4M3_SUBNORMAL_STEP / 2))).all()
    x_codes, x_scales = quantize_fp8_per_token(w)  # the activation side: the same rule per row
    assert torch.equal(x_scales[amax > 0, 0], scales[amax > 0]) and x_codes.shape == w.shape


@pytest.mark.parametrize("rows", [1, 7, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_scaled_mm_equals_the_dequantized_reference(rows, dtype):
    torch.manual_seed(0)
    w, bias = torch.randn(160, 64), torch.randn(160)
    x = torch.randn(rows, 64).to(dtype)
    codes, scales = quantize_fp8_per_channel(w)
    got = fp8_linear(x, codes, scales, bias.to(dtype))
    ref = fp8_linear_reference(x, codes, scales, bias.to(dtype))
    assert got.dtype == dtype and got.shape == (rows, 160)
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # bf16 output rounding
    assert (got.float() - ref.float()).abs().max() <= tol * ref.float().abs().max()
    # and near the unquantized product: both sides rounded to e4m3, errors of ~2^-5 relative per term
    exact = x.float() @ w.t() + bias
    assert (got.float() - exact).abs().mean() < 0.05 * exact.abs().mean()


def test_fp8_leading_dimensions_are_kept():
    codes, scales = quantize_fp8_per_channel(torch.randn(24, 32))
    x = torch.randn(2, 3, 32)
    flat = fp8_linear(x.reshape(6, 32), codes, scales, None)
    assert torch.equal(fp8_linear(x, codes, scales, None), flat.view(2, 3, 24))
