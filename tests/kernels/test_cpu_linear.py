"""kernels/cpu_linear.py: the prepacked oneDNN linear against F.linear, on whatever CPU this is (a host without
bf16 instructions must fall back to the unpacked path instead of failing at load)."""
import pytest
import torch
import torch.nn.functional as F

from afdserve.kernels.cpu_linear import can_prepack, linear, prepack


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_linear_matches_f_linear_with_or_without_a_packed_weight(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=gen).to(dtype)
    weight = torch.randn(48, 64, generator=gen).to(dtype)
    bias = torch.randn(48, generator=gen).to(dtype)
    packed = prepack(weight) if can_prepack(weight) else None
    if dtype == torch.float32:
        assert packed is None  # fp32 stays on MKL, the oracle's path
    out = linear(x, weight, bias, packed)
    expected = F.linear(x.float(), weight.float(), bias.float())
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-1)
