"""Attention backends over the paged KV cache. See metadata.py for the per-step batch description.

Backends share one call: backend(q, k, v, kv_cache, meta, scale, layer) -> out, `layer` being the caller's index
(attention policies keep per-layer state, kernels/attention/sparse/). `torch_paged` is the CPU backend and the
reference; `triton_paged` the CUDA one. `select_attention_backend` picks one per device; triton_paged is imported only
when chosen, so CPU runs never import Triton."""
import importlib.util
from typing import Callable

import torch

from afdserve.kernels.attention.metadata import AttentionMetadata, PrefillBatch, PrefillSeq
from afdserve.kernels.attention.torch_paged import TorchPagedAttention, kv_cache_shape, write_kv

AttentionBackend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, float, int],
                            torch.Tensor]
ATTENTION_BACKENDS = ("auto", "torch", "triton")


def select_attention_backend(name: str, device: torch.device | str) -> AttentionBackend:
    """"auto": Triton on CUDA when it is installed, torch elsewhere; "torch" or "triton" force one. Triton off CUDA
    runs only under its interpreter (TRITON_INTERPRET=1), which is how the tests force it on a CPU."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {name!r}")
    device = torch.device(device)
    has_triton = importlib.util.find_spec("triton") is not None
    if name == "auto":
        name = "triton" if device.type == "cuda" and has_triton else "torch"
    if name == "torch":
        return TorchPagedAttention()
    if not has_triton:
        raise ValueError("attention backend 'triton' needs the triton package")
    import triton

    from afdserve.kernels.attention.triton_paged import TritonPagedAttention
    if device.type != "cuda" and not triton.knobs.runtime.interpret:
        raise ValueError(f"attention backend 'triton' on {device.type} needs TRITON_INTERPRET=1 (Triton's interpreter)")
    return TritonPagedAttention()


__all__ = ["ATTENTION_BACKENDS", "AttentionBackend", "AttentionMetadata", "PrefillBatch", "PrefillSeq",
           "TorchPagedAttention", "kv_cache_shape", "select_attention_backend", "write_kv"]
