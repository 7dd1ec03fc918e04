"""Quantized KV cache: each quantizer against a plain-torch reference written from its formula (KIVI, arXiv:2402.02750; SAQ, arXiv:2410.18441),
packing, and the real bytes behind the block count (the int4 / saq staircase: tests/engine/test_kv_staircase.py)."""
import math

import pytest
import torch

from conftest import ref_minmax
from afdserve.engine.config import CacheConfig, EngineConfig, ModelConfig, parse_staircase
from afdserve.kernels.attention.kv_quant import (FP8_E4M3_MAX, FullPrecisionStore, KiviStore, KVShape, QuantizedKVCache,
                                                 TokenScaledStore, absmax_dequant, absmax_quant, hadamard_matrix,
                                                 minmax_dequant, minmax_quant, pack_bits, rotate_keys, unpack_bits)
from afdserve.kernels.attention.kv_tiers import kv_cache_spec

SHAPE = KVShape(num_kv_heads=2, block_size=16, head_dim=64, dtype=torch.float32)


# ---- quantizers -----------------------------------------------------------------------------------------------
def test_int8_absmax_round_trip_within_half_a_step():
    x = torch.randn(3, 40, 64) * torch.logspace(-2, 2, 40)[None, :, None]  # rows of very different ranges
    q, scale = absmax_quant(x, "int8")
    assert q.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (3, 40, 1)
    step = (x.abs().amax(-1, keepdim=True) / 127).half().float()
    assert torch.allclose(scale.float(), step)
    err = (absmax_dequant(q, scale, "int8", torch.float32) - x).abs()
    assert (err <= step / 2 * 1.001 + 1e-7).all()
    assert err.max() > 0  # it really is quantized


def test_fp8_e4m3_round_trip_within_three_mantissa_bits():
    x = torch.randn(5, 33, 64) * 10
    q, scale = absmax_quant(x, "fp8_e4m3")
    assert q.dtype == torch.uint8
    s = (x.abs().amax(-1, keepdim=True) / FP8_E4M3_MAX).half().float()
    y = absmax_dequant(q, scale, "fp8_e4m3", torch.float32)
    # E4M3: 3 mantissa bits -> relative rounding <= 2^-4; below 2^-6 (subnormals) absolute <= 2^-10, in units of s.
    assert ((y - x).abs() <= (x.abs() * 2 ** -4 + s * 2 ** -10) * 1.001).all()
    assert (y.abs().amax(-1, keepdim=True) <= FP8_E4M3_MAX * s * 1.001).all()


def ref_hadamard(n: int) -> torch.Tensor:
    """Walsh-Hadamard from its closed form: H[i, j] = (-1)^popcount(i & j) / sqrt(n)."""
    i = torch.arange(n)
    bits = (i[:, None] & i[None, :])
    parity = sum((bits >> b) & 1 for b in range(n.bit_length()))
    return (1 - 2 * (parity % 2)).float() / math.sqrt(n)


@pytest.mark.parametrize("n", [1, 2, 16, 64, 256])
def test_hadamard_matches_the_closed_form_and_is_orthonormal(n):
    h = hadamard_matrix(n)
    assert torch.equal(h, ref_hadamard(n))
    torch.testing.assert_close(h @ h, torch.eye(n), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_matrix(n * 3)


@pytest.mark.parametrize("head_dim", [64, 96])  # 96: three Hadamard blocks of 32
def test_rotate_keys_keeps_dot_products_and_undoes_itself(head_dim):
    q, k = torch.randn(2, 5, 3, head_dim, dtype=torch.float64).float()
    block = head_dim & -head_dim
    ref = (k.view(5, 3, -1, block) @ ref_hadamard(block)).view(k.shape)
    torch.testing.assert_close(rotate_keys(k), ref)
    torch.testing.assert_close(rotate_keys(rotate_keys(k)), k, atol=1e-5, rtol=0)
    torch.testing.assert_close((rotate_keys(q) * rotate_keys(k)).sum(-1), (q * k).sum(-1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
def test_token_store_quantizes_rotated_keys_and_plain_values(fmt):
    """Stored K codes are the absmax quantization of k @ H, V codes that of v; load gives back k and v."""
    store = TokenScaledStore(SHAPE, 4, fmt)
    k, v = torch.randn(2, 20, SHAPE.num_kv_heads, SHAPE.head_dim) * torch.linspace(0.1, 8, SHAPE.head_dim)
    slots = torch.randperm(4 * SHAPE.block_size)[:20]
    store.write_tokens(k, v, slots)
    flat = store.data.view(2, SHAPE.num_kv_heads, -1, SHAPE.head_dim)[:, :, slots]
    k_h = (k.transpose(0, 1) @ ref_hadamard(SHAPE.head_dim))
    assert torch.equal(flat[0], absmax_quant(k_h, fmt)[0])
    assert torch.equal(flat[1], absmax_quant(v.transpose(0, 1), fmt)[0])
    blocks = torch.arange(4)
    out = store.load(blocks).view(2, SHAPE.num_kv_heads, -1, SHAPE.head_dim)[:, :, slots]
    tol = 0.02 if fmt == "int8" else 0.1  # relative to each row's absmax
    for got, want in ((out[0], k.transpose(0, 1)), (out[1], v.transpose(0, 1))):
        assert ((got - want).abs().amax(-1) <= tol * want.abs().amax(-1)).all()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_minmax_matches_the_kivi_formula(bits):
    x = torch.randn(4, 16, 64) * 3 + 1
    for dim in (1, -1):  # per channel over tokens (keys), per token over channels (values)
        q, scale, zero = minmax_quant(x, bits, dim)
        y = minmax_dequant(q, scale, zero, torch.float32)
        assert q.max() <= 2 ** bits - 1
        assert torch.allclose(y, ref_minmax(x, bits, dim), atol=1e-6)
        step = (x.amax(dim, keepdim=True) - x.amin(dim, keepdim=True)) / (2 ** bits - 1)
        assert ((y - x).abs() <= step / 2 + 2 ** -9 * x.abs().amax()).all()


def test_minmax_leaves_invalid_rows_out_of_the_range():
    x = torch.randn(2, 16, 8)
    valid = (torch.arange(16) < 5)[None, :, None]
    x_stale = x.clone()
    x_stale[:, 5:] = 1e4  # a reused block's old rows must not widen the scale
    q, scale, zero = minmax_quant(x_stale, 4, dim=1, valid=valid)
    y = minmax_dequant(q, scale, zero, torch.float32)[:, :5]
    assert torch.allclose(y, ref_minmax(x[:, :5], 4, 1), atol=1e-6)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_round_trip_is_exact_and_dense(bits):
    codes = torch.randint(0, 2 ** bits, (3, 5, 64), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.shape == (3, 5, 64 * bits // 8)
    assert torch.equal(unpack_bits(packed, bits), codes)


def test_int4_packs_two_codes_per_byte_low_nibble_first():
    assert pack_bits(torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8), 4).tolist() == [[0x21, 0x0F]]


def test_int4_store_holds_half_the_code_bytes_of_int8():
    int8, int4 = TokenScaledStore(SHAPE, 10, "int8"), KiviStore(SHAPE, 10, 4)
    assert int4.k_codes.nbytes + int4.v_codes.nbytes == int8.data.nbytes // 2


def test_kivi_store_keys_per_channel_values_per_token_group():
    store = KiviStore(SHAPE, 6, 4)
    kv = torch.randn(2, 2, 3, 16, 64)
    kv[0, :, :, :, 5] *= 50  # an outlier key channel: per-channel scales keep the other channels fine
    slots, rows = torch.tensor([4, 0, 2]), torch.tensor([16, 16, 16])
    store.store(slots, kv, rows)
    out = store.load(slots)
    assert torch.allclose(out[0], ref_minmax(kv[0], 4, dim=2), atol=1e-5)  # keys: over each block's tokens
    v_groups = kv[1].reshape(2, 3, 16, 2, 32)  # values: per token, groups of 32 channels
    assert torch.allclose(out[1], ref_minmax(v_groups, 4, dim=-1).reshape(2, 3, 16, 64), atol=1e-5)


# ---- bytes -> blocks ------------------------------------------------------------------------------------------
SMOLLM2 = dict(num_kv_heads=3, head_dim=64, num_layers=30)  # SmolLM2-135M's KV geometry


def smollm2_tokens(fmt: str, budget_gib: float = 1.0, block_size: int = 32) -> int:
    cfg = CacheConfig(block_size=block_size, kv_cache_dtype=fmt)
    shape = KVShape(SMOLLM2["num_kv_heads"], block_size, SMOLLM2["head_dim"], torch.bfloat16)
    spec = kv_cache_spec(fmt, shape, SMOLLM2["num_layers"], cfg.kv_window, cfg.stairs, max_num_seqs=4,
                         max_num_batched_tokens=512, budget_bytes=budget_gib * 2 ** 30)
    return spec.num_blocks(budget_gib * 2 ** 30) * block_size


def test_compression_turns_into_token_capacity():
    bf16 = smollm2_tokens("auto")
    assert smollm2_tokens("int8") / bf16 >= 1.9
    assert smollm2_tokens("fp8_e4m3") / bf16 >= 1.9
    assert smollm2_tokens("int4") / bf16 >= 3.0
    assert smollm2_tokens("saq") / bf16 >= 3.0  # its 2-bit floor, after its stair pools


@pytest.mark.parametrize("fmt", ["auto", "fp8_e4m3", "int8", "int4", "saq"])
def test_block_count_is_paid_by_the_bytes_really_allocated(fmt):
    """pool_bytes + blocks * block_bytes equals the nbytes of every tensor the caches allocate."""
    cfg = CacheConfig(kv_cache_dtype=fmt)
    spec = kv_cache_spec(fmt, SHAPE, 3, 32, cfg.stairs, max_num_seqs=2, max_num_batched_tokens=64,
                         budget_bytes=4 * 2 ** 20)
    num_blocks = spec.num_blocks(4 * 2 ** 20)
    if fmt == "auto":
        allocated = FullPrecisionStore(SHAPE, num_blocks).data.nbytes * 3
    else:
        bits = [b for _, b in spec.stairs]
        caches = [QuantizedKVCache(SHAPE, fmt, num_blocks, bits, list(spec.stair_slots)) for _ in range(3)]
        allocated = sum(t.nbytes for c in caches for s in c.stores for t in vars(s).values()
                        if isinstance(t, torch.Tensor))
    assert allocated == spec.pool_bytes + num_blocks * spec.block_bytes
    assert allocated <= 4 * 2 ** 20


def test_config_rejects_bad_kv_settings():
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        CacheConfig(kv_cache_dtype="int3")
    with pytest.raises(ValueError, match="kv_window"):
        CacheConfig(kv_window=-1)
    with pytest.raises(ValueError, match="bits must fall"):
        CacheConfig(kv_staircase="128:16,256:2,inf:4")
    with pytest.raises(ValueError, match="needs attention_backend 'torch'"):  # Triton reads token formats only
        EngineConfig(model=ModelConfig(attention_backend="triton"), cache=CacheConfig(kv_cache_dtype="int4"))
    EngineConfig(model=ModelConfig(attention_backend="triton"), cache=CacheConfig(kv_cache_dtype="fp8_e4m3"))
    with pytest.raises(ValueError, match="no room"):  # the pinned part of the window pool alone is too big
        kv_cache_spec("int4", SHAPE, 30, 128, [], max_num_seqs=256, max_num_batched_tokens=2048,
                      budget_bytes=2 ** 20).num_blocks(2 ** 20)


def test_stair_pools_take_at_most_half_the_budget_past_the_pinned_blocks():
    budget = 2 ** 30
    spec = kv_cache_spec("saq", KVShape(3, 16, 64, torch.bfloat16), 30, 128,
                         parse_staircase("128:16,1024:8,4096:4,inf:2"), max_num_seqs=256,
                         max_num_batched_tokens=2048, budget_bytes=budget)
    assert budget / 2 * 0.99 <= spec.pool_bytes <= budget / 2
    assert spec.stair_slots[0] >= 2 * (2048 // 16)  # the blocks one step may write, pinned
    assert spec.num_blocks(budget) > 0
