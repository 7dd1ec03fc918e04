"""Weight-only int8 linears: the quantizer against its formula, and torch's fused CPU kernel against the
dequantize-then-F.linear reference and against the unquantized product."""
import pytest
import torch
import torch.nn.functional as F

from afdserve.kernels.quant_linear import int8_linear, int8_linear_reference, quantize_int8_per_channel


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
