"""HyperAttention's angular LSH (Han et al., ICLR 2024): r sign bits of fixed Gaussian projections, ranked in the
reflected Gray code so that buckets next to each other differ in one bit. Shared by the decode policy (hyper.py) and
the prefill (hyper_prefill.py)."""
from __future__ import annotations

import torch

LSH_BITS = 7  # 128 buckets, the paper's default
_PROJECTION_SEED = 0x5EED


def gray_ranks(bits: int) -> torch.Tensor:
    """[2^bits] long: each bit pattern's position in the reflected Gray code sequence
    (a_r = [a_{r-1}, reverse(a_{r-1}) + 2^{r-1}])."""
    sequence = [0]
    for r in range(bits):
        sequence = sequence + [x + (1 << r) for x in reversed(sequence)]
    ranks = torch.empty(1 << bits, dtype=torch.long)
    ranks[torch.tensor(sequence)] = torch.arange(1 << bits)
    return ranks


class AngularLSH:
    """Sign bits of r fixed Gaussian projections, as a Gray-code bucket rank in [0, 2^r)."""

    def __init__(self, head_dim: int, bits: int, device: torch.device):
        generator = torch.Generator().manual_seed(_PROJECTION_SEED)
        self.projections = torch.randn(head_dim, bits, generator=generator).to(device)
        self.ranks = gray_ranks(bits).to(device)
        self.powers = (2 ** torch.arange(bits)).to(device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., head_dim] -> bucket ranks [...] (uint8)."""
        bits = (x.float() @ self.projections) > 0
        return self.ranks[(bits.long() * self.powers).sum(-1)].to(torch.uint8)
