"""Rotary position embedding (neox layout: the head's two halves rotate together), with llama3 and YaRN frequency
scaling."""
from __future__ import annotations

import math

import torch
from torch import nn

RopeTables = tuple[torch.Tensor, torch.Tensor]  # (cos, signed sin) at one step's positions, [T, 1, head_dim]


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1's rule: keep high frequencies, divide low ones by `factor`, blend smoothly in between."""
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_len / low_freq_factor
    high_freq_wavelen = old_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature (arXiv:2309.00071, eq. 21): 0.1 * mscale * ln(factor) + 1, for factor > 1."""
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def yarn_inv_freq(inv_freq: torch.Tensor, base: float, scaling: dict) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv:2309.00071): frequencies that turn fewer than `beta_slow` times over the original context are
    divided by `factor` (interpolated), those turning more than `beta_fast` times are kept (extrapolated), a linear
    ramp over the dimensions in between. Returns the frequencies and the factor cos and sin are scaled by (DeepSeek:
    mscale(factor, mscale) / mscale(factor, mscale_all_dim))."""
    dim = 2 * inv_freq.numel()
    factor, old_len = scaling.get("factor"), scaling.get("original_max_position_embeddings")
    if not factor or not old_len:
        raise ValueError(f"rope scaling 'yarn' needs 'factor' and 'original_max_position_embeddings', got {scaling}")

    def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times over the original context
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(scaling.get("beta_fast") or 32), dim_of(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 0.001)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else yarn_mscale(factor))
    return inv_freq, float(attention_factor)


def rope_type_of(scaling: dict | None) -> str:
    return (scaling or {}).get("rope_type", (scaling or {}).get("type")) or "default"


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, base: float, scaling: dict | None = None):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        rope_type = rope_type_of(scaling)
        attention_factor = 1.0
        if rope_type == "llama3":
            inv_freq = llama3_inv_freq(inv_freq, scaling)
        elif rope_type == "yarn":
            inv_freq, attention_factor = yarn_inv_freq(inv_freq, base, scaling)
        elif rope_type != "default":
            raise ValueError(f"unsupported rope scaling type {rope_type!r}; supported: default, llama3, yarn")
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos() * attention_factor, emb.sin() * attention_factor
        self.register_buffer("cos", cos, persistent=False)

        # rotate_half(x) * sin == swap_halves(x) * signed_sin, with the sign folded into the table once.
        half = head_dim // 2
        self.register_buffer("signed_sin", torch.cat([-sin[:, :half], sin[:, half:]], -1), persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> RopeTables:
        """cos and signed sin at `positions`, [T, 1, head_dim]: looked up once per step and shared by all layers."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.signed_sin[positions].unsqueeze(1).to(dtype)


def apply_rotary(x: torch.Tensor, tables: RopeTables) -> torch.Tensor:
    """x: [T, heads, head_dim]; neox layout, the two halves of each head rotate together."""
    cos, signed_sin = tables
    half = x.shape[-1] // 2
    swapped = x.unflatten(-1, (2, half)).flip(-2).flatten(-2)
    return x * cos + swapped * signed_sin
