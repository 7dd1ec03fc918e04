"""Quantized KV cache: the quantizers, the per-block stores, and `QuantizedKVCache` (one per layer).

Formats (KIVI, arXiv:2402.02750; SAQ's staircase, arXiv:2410.18441):
    fp8_e4m3, int8   every token quantized on write: per-(token, head) symmetric absmax scale (fp16), no window.
                     Keys are quantized in a Walsh-Hadamard basis (rotate_keys): it spreads the few large RoPE'd key
                     channels over all channels, so E4M3's 3-bit mantissa error on them no longer dominates q.k
                     (SmolLM2 perplexity over 2,048 tokens: fp8 +0.98% plain, +0.28% rotated; int8 unchanged).
    int4 (KIVI)      keys per channel over the block's tokens (KIVI's key group is the block), values per token
                     in groups of 32 channels; asymmetric min/max, fp16 scale and min; two codes per byte.
                     The newest R tokens stay in full precision (the window).
    saq              a staircase of such KIVI stores: a block steps down to fewer bits as it ages (kv_tiers.py).
int4 is the two-stair staircase "R:16,inf:4", so int4 and saq share one mechanism: each logical block has its
floor-precision home at its block id, and while it is young it also holds a slot in a pool of the higher stair it
is on. `gather` dequantizes into the [2, kv_heads, n * block_size, head_dim] layout of torch_paged.gather_kv, so
decode_attention / prefill_attention run unchanged on top.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from afdserve.kernels.attention.torch_paged import write_kv

FULL_BITS = 16  # a stair of 16 bits is the model dtype itself
FP16_TINY = 2.0 ** -14  # smallest normal fp16: floor for stored scales, so that no scale rounds to 0
FP8_E4M3_MAX = 448.0  # OCP E4M3FN
VALUE_GROUP = 32  # KIVI's G: value channels that share one scale and min


# ---- the math -------------------------------------------------------------------------------------------------
def absmax_quant(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization along the last dim: x ~ q * scale, one fp16 scale per row.

    int8: q = round(x / scale) in [-127, 127], scale = absmax / 127. fp8_e4m3: q = e4m3(x / scale), scale =
    absmax / 448, stored as raw bytes (uint8) so that index ops work on every device."""
    qmax = 127.0 if fmt == "int8" else FP8_E4M3_MAX
    scale = (x.float().abs().amax(-1, keepdim=True) / qmax).clamp_min(FP16_TINY).half()
    y = x.float() / scale.float()
    if fmt == "int8":
        return y.round().clamp(-127, 127).to(torch.int8), scale
    return y.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8), scale


@functools.lru_cache(maxsize=16)
def _hadamard(n: int, device: str) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return (h / n ** 0.5).to(device)


def hadamard_matrix(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Sylvester's Walsh-Hadamard matrix of order n (a power of two) over sqrt(n): symmetric and orthonormal.
    Cached per (n, device): callers must not write into it."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard matrix here needs a power-of-two order, got {n}")
    return _hadamard(n, str(device))


def rotate_keys(x: torch.Tensor) -> torch.Tensor:
    """x @ H along the last dim (fp32 out), H block-diagonal with Hadamard blocks of the largest power of two that
    divides head_dim. H is symmetric and orthonormal: the same call undoes it, and q.k = (q H).(k H), so a kernel
    reading rotated keys rotates its queries instead of the keys."""
    d = x.shape[-1]
    n = d & -d
    return (x.float().view(*x.shape[:-1], d // n, n) @ hadamard_matrix(n, x.device)).view(x.shape)


def absmax_dequant(q: torch.Tensor, scale: torch.Tensor, fmt: str, dtype: torch.dtype) -> torch.Tensor:
    values = q.float() if fmt == "int8" else q.view(torch.float8_e4m3fn).float()
    return (values * scale.float()).to(dtype)


def minmax_quant(x: torch.Tensor, bits: int, dim: int, valid: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KIVI's asymmetric quantizer, reducing over `dim`: scale = (max - min) / (2^b - 1), zero = min,
    q = round((x - min) / scale) clamped to [0, 2^b - 1]. Returns uint8 codes and fp16 scale, zero (keepdim).

    `valid` (broadcastable to x, bool) leaves rows out of the min/max: a partly filled block's stale rows."""
    xf = x.float()
    lo_src = xf if valid is None else xf.masked_fill(~valid, float("inf"))
    hi_src = xf if valid is None else xf.masked_fill(~valid, float("-inf"))
    lo = lo_src.amin(dim, keepdim=True)
    hi = hi_src.amax(dim, keepdim=True)
    lo, hi = torch.where(lo > hi, 0.0, lo), torch.where(lo > hi, 0.0, hi)  # nothing valid: an empty group
    levels = 2 ** bits - 1
    zero = lo.half()
    scale = ((hi - lo) / levels).clamp_min(FP16_TINY).half()
    q = ((xf - zero.float()) / scale.float()).round().clamp(0, levels).to(torch.uint8)
    return q, scale, zero


def minmax_dequant(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.float() + zero.float()).to(dtype)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes < 2^bits along the last dim -> 8 // bits codes per byte, the first in the low bits."""
    per_byte = 8 // bits
    if per_byte == 1:
        return codes
    parts = codes.view(*codes.shape[:-1], -1, per_byte)
    packed = parts[..., 0].clone()
    for i in range(1, per_byte):
        packed |= parts[..., i] << (bits * i)
    return packed


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per_byte = 8 // bits
    if per_byte == 1:
        return packed
    mask = 2 ** bits - 1
    parts = [(packed >> (bits * i)) & mask for i in range(per_byte)]
    return torch.stack(parts, -1).view(*packed.shape[:-1], -1)


# ---- block stores: one pool of block-shaped slots in one format ----------------------------------------------
@dataclass(frozen=True)
class KVShape:
    num_kv_heads: int
    block_size: int
    head_dim: int
    dtype: torch.dtype  # the model's: what gather returns and full-precision stairs store
    planes: int = 2  # K and V; 1 for MLA's latent cache, which only the plain ("auto") format holds

    @property
    def block_elems(self) -> int:  # of K or of V
        return self.num_kv_heads * self.block_size * self.head_dim


class FullPrecisionStore:
    """The plain torch_paged layout: [2, kv_heads, slots, block_size, head_dim] in the model dtype."""

    def __init__(self, shape: KVShape, num_slots: int):
        self.shape = shape
        self.data = torch.zeros(2, shape.num_kv_heads, num_slots, shape.block_size, shape.head_dim,
                                dtype=shape.dtype)

    @staticmethod
    def bytes_per_block(shape: KVShape) -> int:
        return shape.planes * shape.block_elems * torch.empty(0, dtype=shape.dtype).element_size()

    def write_tokens(self, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        write_kv(self.data, k, v, slot_mapping)

    def store(self, slots: torch.Tensor, kv: torch.Tensor, rows: torch.Tensor) -> None:
        self.data.index_copy_(2, slots, kv.to(self.data.dtype))

    def load(self, slots: torch.Tensor) -> torch.Tensor:
        return self.data.index_select(2, slots)


class TokenScaledStore:
    """fp8_e4m3 / int8: one byte per element plus an fp16 scale per (K or V, head, token); keys stored rotated
    (rotate_keys). fp8 codes are E4M3 bytes kept as uint8, the layout the Triton kernels dequantize in registers."""

    def __init__(self, shape: KVShape, num_slots: int, fmt: str, device: torch.device | str = "cpu"):
        self.shape, self.fmt = shape, fmt
        h, bs, hd = shape.num_kv_heads, shape.block_size, shape.head_dim
        self.data = torch.zeros(2, h, num_slots, bs, hd, dtype=torch.int8 if fmt == "int8" else torch.uint8,
                                device=device)
        self.scale = torch.zeros(2, h, num_slots, bs, 1, dtype=torch.float16, device=device)

    @staticmethod
    def bytes_per_block(shape: KVShape) -> int:
        return 2 * shape.block_elems + 2 * shape.num_kv_heads * shape.block_size * 2

    def write_tokens(self, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        q, scale = absmax_quant(torch.stack([rotate_keys(k), v.float()]).transpose(1, 2), self.fmt)  # [2, kvh, T, hd]
        _, h, n, bs, hd = self.data.shape
        self.data.view(2, h, n * bs, hd).index_copy_(2, slot_mapping, q)
        self.scale.view(2, h, n * bs, 1).index_copy_(2, slot_mapping, scale)

    def load(self, slots: torch.Tensor) -> torch.Tensor:
        kv = absmax_dequant(self.data.index_select(2, slots), self.scale.index_select(2, slots), self.fmt,
                            torch.float32)
        return torch.stack([rotate_keys(kv[0]), kv[1]]).to(self.shape.dtype)


class KiviStore:
    """`bits`-bit KIVI blocks (bits in 2, 4, 8). Keys: per (head, channel) over the block's tokens, one fp16 scale
    and min each; values: per (head, token, group of VALUE_GROUP channels). Codes packed 8 // bits per byte."""

    def __init__(self, shape: KVShape, num_slots: int, bits: int):
        self.shape, self.bits = shape, bits
        h, bs, hd = shape.num_kv_heads, shape.block_size, shape.head_dim
        g = value_groups(hd)
        self.k_codes = torch.zeros(h, num_slots, bs, hd * bits // 8, dtype=torch.uint8)
        self.v_codes = torch.zeros(h, num_slots, bs, hd * bits // 8, dtype=torch.uint8)
        self.k_scale = torch.zeros(h, num_slots, 1, hd, dtype=torch.float16)
        self.k_zero = torch.zeros(h, num_slots, 1, hd, dtype=torch.float16)
        self.v_scale = torch.zeros(h, num_slots, bs, g, dtype=torch.float16)
        self.v_zero = torch.zeros(h, num_slots, bs, g, dtype=torch.float16)

    @staticmethod
    def bytes_per_block(shape: KVShape, bits: int) -> int:
        h, bs, hd = shape.num_kv_heads, shape.block_size, shape.head_dim
        codes = 2 * shape.block_elems * bits // 8
        return codes + h * hd * 2 * 2 + h * bs * value_groups(hd) * 2 * 2

    def store(self, slots: torch.Tensor, kv: torch.Tensor, rows: torch.Tensor) -> None:
        """Quantizes whole blocks kv [2, kvh, n, bs, hd] into `slots`; rows[i]: how many of block i's tokens are
        real (the rest are left out of the key channels' min/max)."""
        k, v = kv[0], kv[1]
        valid = (torch.arange(self.shape.block_size) < rows[:, None])[None, :, :, None]  # [1, n, bs, 1]
        kq, ks, kz = minmax_quant(k, self.bits, dim=2, valid=valid)
        vq, vs, vz = minmax_quant(self._grouped(v), self.bits, dim=-1)
        self.k_codes.index_copy_(1, slots, pack_bits(kq, self.bits))
        self.k_scale.index_copy_(1, slots, ks)
        self.k_zero.index_copy_(1, slots, kz)
        self.v_codes.index_copy_(1, slots, pack_bits(vq.flatten(-2), self.bits))
        self.v_scale.index_copy_(1, slots, vs.squeeze(-1))
        self.v_zero.index_copy_(1, slots, vz.squeeze(-1))

    def load(self, slots: torch.Tensor) -> torch.Tensor:
        dtype = self.shape.dtype
        kq = unpack_bits(self.k_codes.index_select(1, slots), self.bits)
        k = minmax_dequant(kq, self.k_scale.index_select(1, slots), self.k_zero.index_select(1, slots), dtype)
        vq = self._grouped(unpack_bits(self.v_codes.index_select(1, slots), self.bits))
        v = minmax_dequant(vq, self.v_scale.index_select(1, slots)[..., None],
                           self.v_zero.index_select(1, slots)[..., None], dtype)
        return torch.stack([k, v.flatten(-2)])

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], value_groups(self.shape.head_dim), -1)


def value_groups(head_dim: int) -> int:
    """Value channel groups per head: head_dim / 32, or one group when the head is narrower."""
    return head_dim // min(VALUE_GROUP, head_dim)


# ---- one layer's cache --------------------------------------------------------------------------------------
class QuantizedKVCache:
    """One layer's quantized KV cache: `write` the step's K/V (quantize on write), `gather` blocks dequantized.

    Token formats (fp8_e4m3, int8) quantize each token into its slot. Staircase formats (int4, saq) hold stores
    `stairs[0..]`: stairs[0] the full-precision window, the last the floor (indexed by block id); the step's plan
    (kv_tiers.KVStepPlan, built once per step by the runner and shared by every layer) says which blocks move."""

    def __init__(self, shape: KVShape, fmt: str, num_blocks: int, stair_bits: list[int] | None = None,
                 stair_slots: list[int] | None = None, device: torch.device | str = "cpu"):
        self.shape, self.fmt = shape, fmt
        self.plan = None
        if fmt in ("fp8_e4m3", "int8"):
            self.stores = [TokenScaledStore(shape, num_blocks, fmt, device)]
            return
        if torch.device(device).type != "cpu":
            raise NotImplementedError(f"kv_cache_dtype {fmt} keeps its staircase on the host only")
        slots = [*stair_slots, num_blocks]
        self.stores = [FullPrecisionStore(shape, slots[0])]
        self.stores += [KiviStore(shape, n, b) for b, n in zip(stair_bits[1:], slots[1:])]

    @property
    def token_store(self) -> TokenScaledStore:
        """The one store of a token format (fp8_e4m3, int8), whose codes and scales the Triton kernels read."""
        if not isinstance(self.stores[0], TokenScaledStore):
            raise ValueError(f"kv_cache_dtype {self.fmt} keeps blocks on a staircase of stores; only fp8_e4m3 and "
                             f"int8 have one token-scaled store")
        return self.stores[0]

    def kernel_operands(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes, scales, q) for a kernel that reads a token format in place: its keys are stored rotated, so the
        queries are rotated to match (q.k = (qH).(kH))."""
        store = self.token_store
        return store.data, store.scale, rotate_keys(q).to(q.dtype)

    def write(self, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor, plan) -> None:
        """Stores the step's tokens at `slot_mapping`. Staircase formats first replay the step's plan, once per
        step (micro-batches share it), so slot_mapping points into the full-precision stair."""
        if plan is not None and plan is not self.plan:
            self.plan = plan  # gathers read through this step's block -> (stair, slot) view
            for move in plan.moves:
                self._move(move)
        self.stores[0].write_tokens(k, v, slot_mapping)

    def gather(self, block_ids: torch.Tensor) -> torch.Tensor:
        """K and V of `block_ids` ([n]) dequantized and laid end to end: [2, kv_heads, n * block_size, head_dim]."""
        h, hd = self.shape.num_kv_heads, self.shape.head_dim
        if self.plan is None:
            return self.stores[0].load(block_ids).view(2, h, -1, hd)
        stair = self.plan.stair_of[block_ids]
        slot = self.plan.slot_of[block_ids]
        out = torch.empty(2, h, len(block_ids), self.shape.block_size, hd, dtype=self.shape.dtype)
        for s, store in enumerate(self.stores):
            rows = (stair == s).nonzero().squeeze(1)
            if len(rows):
                out[:, :, rows] = store.load(slot[rows])
        return out.view(2, h, -1, hd)

    def _move(self, move) -> None:
        """Re-stores blocks from one stair to another: dequantize at the source, quantize at the destination."""
        kv = self.stores[move.src].load(move.src_slots)
        self.stores[move.dst].store(move.dst_slots, kv, move.rows)
