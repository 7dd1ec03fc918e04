"""Paged attention kernel micro-benchmark: each kernel on synthetic paged caches, per GQA ratio, reporting achieved
GB/s and, on CUDA, the fraction of the card's peak HBM bandwidth (bench/kernels.HBM_PEAKS).

    decode   batch sequences of `context` cached tokens, one query token each
    prefill  batch chunks of `chunk` new tokens at the end of `context` cached tokens (prefix = context - chunk)

Paths: the torch backend (kernels/attention/torch_paged.py) everywhere; the Triton kernels only on CUDA (the CPU
interpreter says nothing about speed). Each sequence owns shuffled blocks, as in a long-running cache.
kv_dtype int8 / fp8_e4m3: a kv_quant.QuantizedKVCache with random codes and per-token scales; Triton dequantizes
tiles in registers, the torch backend dequantizes (and un-rotates keys) on gather.
Bytes counted: K and V of every cached token once per KV head (codes plus scales when quantized), plus q and out (a
kernel that re-reads K/V, like a prefill's query tiles, can exceed the HBM peak on this count through cache hits).
FLOPs: 4 * d per (query head, visible key). Timing: CUDA, triton.testing.do_bench's median (it clears L2 before each
call: cold-cache timing); CPU, the median of `repeats` calls after one warm-up.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from afdserve.kernels.attention.kv_quant import KVShape, QuantizedKVCache
from afdserve.kernels.attention.torch_paged import decode_attention, decode_mask_bias, prefill_attention

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Peak HBM bandwidth by device name (GB/s), first match wins: (substrings that must all occur, label, GB/s).
HBM_PEAKS = (
    (("H200",), "H200", 4800.0),
    (("H100", "PCIe"), "H100 PCIe", 2000.0),
    (("H100", "HBM3"), "H100 SXM", 3350.0),
    (("H100", "SXM"), "H100 SXM", 3350.0),
)


@dataclass(frozen=True)
class KernelBenchSpec:
    kernels: tuple[str, ...] = ("decode", "prefill")
    batch: int = 8
    context: int = 1024  # cached tokens per sequence after the step (queries included)
    chunk: int = 128  # prefill: new tokens per sequence
    kv_heads: int = 8
    head_dim: int = 128
    groups: tuple[int, ...] = (4, 8)  # query heads per KV head
    block_size: int = 16
    dtype: str = "bfloat16"
    kv_dtype: str = "auto"  # auto (= dtype), int8, fp8_e4m3
    backends: tuple[str, ...] = ("torch", "triton")  # triton runs on CUDA only
    repeats: int = 5
    device: str = "auto"  # auto: cuda when available
    seed: int = 0

    def __post_init__(self) -> None:
        if not set(self.kernels) <= {"decode", "prefill"}:
            raise ValueError(f"kernels must be among decode, prefill; got {self.kernels}")
        if not set(self.backends) <= {"torch", "triton"}:
            raise ValueError(f"backends must be among torch, triton; got {self.backends}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.kv_dtype not in ("auto", "int8", "fp8_e4m3"):
            raise ValueError(f"kv_dtype must be auto, int8 or fp8_e4m3, got {self.kv_dtype!r}")
        if min(self.batch, self.context, self.chunk, self.kv_heads, self.head_dim, self.repeats, *self.groups) < 1:
            raise ValueError("batch, context, chunk, kv_heads, head_dim, repeats and groups must be >= 1")
        if "prefill" in self.kernels and self.chunk > self.context:
            raise ValueError(f"chunk ({self.chunk}) must be <= context ({self.context})")


def hbm_peak(device_name: str) -> tuple[str, float] | None:
    """(label, GB/s) of the card's peak HBM bandwidth, or None for a card not in HBM_PEAKS."""
    for needles, label, gbps in HBM_PEAKS:
        if all(n in device_name for n in needles):
            return label, gbps
    return None


def paged_inputs(spec: KernelBenchSpec, group: int, device: torch.device) -> dict:
    """Random cache, block tables and queries for `spec` (decode: one query per sequence; prefill: `chunk`)."""
    g = torch.Generator(device=device).manual_seed(spec.seed)
    dtype = _DTYPES[spec.dtype]
    blocks_per_seq = -(-spec.context // spec.block_size)
    num_blocks = spec.batch * blocks_per_seq
    kv = torch.randn(2, spec.kv_heads, num_blocks, spec.block_size, spec.head_dim, generator=g, device=device,
                     dtype=dtype)
    if spec.kv_dtype != "auto":  # random codes: E4M3 bytes of N(0, 64^2) values, or int8 in [-127, 127]
        cache = QuantizedKVCache(KVShape(spec.kv_heads, spec.block_size, spec.head_dim, dtype), spec.kv_dtype,
                                 num_blocks, device=device)
        store = cache.token_store
        if spec.kv_dtype == "int8":
            store.data.copy_((kv * 42).round().clamp(-127, 127))
        else:
            store.data.copy_((kv * 64).to(torch.float8_e4m3fn).view(torch.uint8))
        store.scale.copy_(torch.rand(store.scale.shape, generator=g, device=device) / 64 + 1 / 128)
        kv = cache
    tables = torch.randperm(num_blocks, generator=g, device=device).view(spec.batch, blocks_per_seq)
    seq_lens = torch.full((spec.batch,), spec.context, dtype=torch.int32, device=device)
    heads = spec.kv_heads * group
    return dict(kv=kv, tables=tables, seq_lens=seq_lens,
                q_decode=torch.randn(spec.batch, heads, spec.head_dim, generator=g, device=device, dtype=dtype),
                q_prefill=torch.randn(spec.batch * spec.chunk, heads, spec.head_dim, generator=g, device=device,
                                      dtype=dtype))


def kernel_operands(kv, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(codes, kv_scale, q) as the Triton kernels take them: the cache tensor and q as they are, or a quantized
    cache's codes, scales and queries rotated to match its keys (QuantizedKVCache.kernel_operands)."""
    return (kv, None, q) if isinstance(kv, torch.Tensor) else kv.kernel_operands(q)


def kernel_calls(kernel: str, spec: KernelBenchSpec, inputs: dict, device: torch.device
                 ) -> dict[str, Callable[[], object]]:
    """backend name -> a call of that backend's kernel(s) on the inputs, for the spec's backends that can run here."""
    kv, tables, seq_lens = inputs["kv"], inputs["tables"], inputs["seq_lens"]
    scale = spec.head_dim ** -0.5
    q = inputs["q_decode" if kernel == "decode" else "q_prefill"]
    codes, kv_scale, q_kernel = kernel_operands(kv, q)
    calls = {}
    if kernel == "decode":
        if "torch" in spec.backends:
            bias = decode_mask_bias(seq_lens, tables.shape[1] * spec.block_size)
            calls["torch"] = lambda: decode_attention(q, kv, tables, bias, scale)
        if "triton" in spec.backends and device.type == "cuda":
            from afdserve.kernels.attention.triton_paged import paged_decode
            calls["triton"] = lambda: paged_decode(q_kernel, codes, tables, seq_lens, scale, kv_scale=kv_scale)
        return calls
    chunks = q.view(spec.batch, spec.chunk, *q.shape[1:])
    if "torch" in spec.backends:
        calls["torch"] = lambda: [prefill_attention(chunks[s], kv, tables[s], spec.context, scale)
                                  for s in range(spec.batch)]
    if "triton" in spec.backends and device.type == "cuda":
        from afdserve.kernels.attention.triton_paged import paged_attention
        starts = torch.arange(0, spec.batch * spec.chunk + 1, spec.chunk, dtype=torch.int32, device=device)
        calls["triton"] = lambda: paged_attention(q_kernel, codes, tables, seq_lens, starts, spec.chunk, scale,
                                                  kv_scale=kv_scale)
    return calls


def traffic(kernel: str, spec: KernelBenchSpec, group: int) -> tuple[int, int]:
    """(bytes, flops) of one call, as counted in the module docstring."""
    elem = torch.finfo(_DTYPES[spec.dtype]).bits // 8
    heads = spec.kv_heads * group
    queries = 1 if kernel == "decode" else spec.chunk
    per_head_token = spec.head_dim * elem if spec.kv_dtype == "auto" else spec.head_dim + 2  # codes + fp16 scale
    kv_bytes = spec.batch * spec.context * spec.kv_heads * per_head_token * 2
    qo_bytes = 2 * spec.batch * queries * heads * spec.head_dim * elem
    prefix = spec.context - queries  # query i of the chunk sees prefix + i + 1 keys
    visible = queries * prefix + queries * (queries + 1) // 2
    return kv_bytes + qo_bytes, 4 * spec.head_dim * heads * spec.batch * visible


def time_call(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median milliseconds of one call."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, return_mode="median")
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def run_kernel_bench(spec: KernelBenchSpec, peak_gbps: float | None = None) -> dict:
    """Times every (kernel, group, backend); peak_gbps overrides the device-name lookup of the HBM peak."""
    device = torch.device("cuda" if spec.device == "auto" and torch.cuda.is_available() else
                          "cpu" if spec.device == "auto" else spec.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = ("given", peak_gbps) if peak_gbps else hbm_peak(name) if device.type == "cuda" else None
    rows = []
    with torch.inference_mode():
        for group in spec.groups:
            inputs = paged_inputs(spec, group, device)
            for kernel in spec.kernels:
                nbytes, flops = traffic(kernel, spec, group)
                for backend, fn in kernel_calls(kernel, spec, inputs, device).items():
                    ms = time_call(fn, device, spec.repeats)
                    gbps = nbytes / ms / 1e6
                    rows.append(dict(kernel=kernel, backend=backend, group=group, ms=ms, gbps=gbps,
                                     tflops=flops / ms / 1e9, peak_fraction=gbps / peak[1] if peak else None))
            del inputs
    return dict(spec=asdict(spec), device=name, peak=None if peak is None else dict(label=peak[0], gbps=peak[1]),
                threads=torch.get_num_threads(), results=rows)


def format_kernel_result(result: dict) -> str:
    s, peak = result["spec"], result["peak"]
    peak_text = (f"peak HBM {peak['gbps']:.0f} GB/s ({peak['label']})" if peak else
                 "peak HBM unknown for this device (pass --peak-gbps)" if result["device"] != "cpu" else
                 f"{result['threads']} threads")
    lines = [f"paged attention on {result['device']}, {peak_text}: batch {s['batch']}, context {s['context']}, "
             f"prefill chunk {s['chunk']}, {s['kv_heads']} KV heads, head_dim {s['head_dim']}, "
             f"block {s['block_size']}, {s['dtype']}" + ("" if s["kv_dtype"] == "auto" else f", KV {s['kv_dtype']}"),
             f"{'kernel':>8} {'backend':>8} {'GQA':>4} {'ms':>10} {'GB/s':>9} {'%peak':>6} {'TFLOP/s':>8}"]
    for r in result["results"]:
        pct = "-" if r["peak_fraction"] is None else f"{100 * r['peak_fraction']:.1f}"
        lines.append(f"{r['kernel']:>8} {r['backend']:>8} {r['group']:>4} {r['ms']:>10.4f} {r['gbps']:>9.1f} "
                     f"{pct:>6} {r['tflops']:>8.2f}")
    return "\n".join(lines)
