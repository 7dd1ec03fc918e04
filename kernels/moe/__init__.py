"""MoE expert compute: routing result -> token permutation (sorted by expert) -> per-expert gate_up / SiLU*mul / down
-> weighted combine. `torch_moe` is the CPU path (and the shape of the Triton path to come); `reference` is the naive
per-token loop every path is tested against."""
from kernels.moe.reference import moe_reference
from kernels.moe.torch_moe import ExpertPermutation, fused_experts_torch, permute_by_expert

__all__ = ["ExpertPermutation", "fused_experts_torch", "moe_reference", "permute_by_expert"]
