"""Attention backends over the paged KV cache. See metadata.py for the per-step batch description."""
from kernels.attention.metadata import AttentionMetadata, PrefillSeq
from kernels.attention.torch_paged import TorchPagedAttention, kv_cache_shape, write_kv

__all__ = ["AttentionMetadata", "PrefillSeq", "TorchPagedAttention", "kv_cache_shape", "write_kv"]
