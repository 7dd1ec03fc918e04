"""Engine configuration: one typed config built at the entry point (LLM, CLI, server) and passed down."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from afdserve.kernels.attention import ATTENTION_BACKENDS


@dataclass
class ModelConfig:
    model: str = "smollm2"  # alias, HF-format directory, or .gguf file
    dtype: str = "auto"  # auto (the checkpoint's), float32, bfloat16, float16
    max_model_len: int | None = None  # default: the model's context length
    seed: int = 0  # for requests without a seed of their own
    cache_dir: Path | None = None  # where imported GGUF models live; None: $AFDSERVE_CACHE or ~/.cache/afdserve
    attention_backend: str = "auto"  # auto (Triton on CUDA, torch on CPU), torch, or triton
    device: str = "auto"  # auto (cuda when present, else cpu), cpu, cuda or cuda:N; resolved here

    def __post_init__(self) -> None:
        self.device = resolve_device(self.device)
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                             f"got {self.attention_backend!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")


def resolve_device(name: str) -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; other names are checked against what this host has."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA GPU on this host")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} asked for, but this host has {torch.cuda.device_count()} CUDA GPU(s)")
    return str(device)


@dataclass
class CacheConfig:
    block_size: int = 16
    kv_cache_memory_gb: float = 1.0  # KV pool size; num_kv_blocks overrides it
    num_kv_blocks: int | None = None
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"  # auto (the model dtype), fp8_e4m3, int8, int4 (KIVI), saq (staircase)
    kv_window: int = 128  # int4: the newest tokens kept in full precision (KIVI's R)
    kv_staircase: str = "128:16,256:8,384:4,inf:2"  # saq: "age:bits,...", see parse_staircase

    def __post_init__(self) -> None:
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be one of 8, 16, 32, 64, 128, got {self.block_size}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.kv_window < 0:
            raise ValueError(f"kv_window must be >= 0, got {self.kv_window}")
        self.stairs = parse_staircase(self.kv_staircase)
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")


KV_CACHE_DTYPES = ("auto", "fp8_e4m3", "int8", "int4", "saq")
STAIR_BITS = (16, 8, 4, 2)


def parse_staircase(text: str) -> list[tuple[float, int]]:
    """'128:16,256:8,384:4,inf:2' -> [(128, 16), (256, 8), (384, 4), (inf, 2)].

    Each stair is `age:bits`: a KV block whose newest token has fewer than `age` newer tokens after it is stored
    at `bits` (16 = the model dtype). Ages rise, bits fall, the first stair is 16 (the full-precision window,
    which may be 0: only the unfilled block) and the last age is inf (the floor)."""
    try:
        stairs = [(float(age) if age.strip() == "inf" else int(age), int(bits))
                  for age, bits in (part.split(":") for part in text.split(","))]
    except ValueError:
        raise ValueError(f"kv_staircase must look like 128:16,256:8,384:4,inf:2 (age:bits,...), got {text!r}") from None
    ages, bits = [a for a, _ in stairs], [b for _, b in stairs]
    problems = []
    if len(stairs) < 2:
        problems.append("needs at least two stairs")
    if bits[0] != 16:
        problems.append("the first stair must be 16 bits")
    if any(b not in STAIR_BITS for b in bits):
        problems.append(f"bits must be among {STAIR_BITS}")
    if any(b1 <= b2 for b1, b2 in zip(bits, bits[1:])):
        problems.append("bits must fall stair by stair")
    if ages[-1] != float("inf") or any(a1 >= a2 for a1, a2 in zip(ages, ages[1:])) or ages[0] < 0:
        problems.append("ages must rise from >= 0 and the last must be inf")
    if problems:
        raise ValueError(f"kv_staircase {text!r}: " + "; ".join(problems))
    return stairs


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")


MOE_PARALLEL_POLICIES = ("ep", "sliced", "adaptive")  # cluster/moe_parallel.py


@dataclass
class ParallelConfig:
    """Attention-FFN disaggregation: `afd="1A1F"` runs x attention workers and y FFN workers as Ray actors."""
    afd: str | None = None  # None: the whole model in this process (LocalExecutor)
    micro_batches: int = 2  # micro-batches in flight per step, so FFN work of one overlaps attention of the next
    ray_address: str | None = None  # None: start a local Ray; "auto": join a running cluster
    transport: str = "gloo"  # the A<->F data plane: "gloo" (torch.distributed) or "shm" (shared memory, one host)
    threads_per_worker: int | None = None  # torch threads per worker; None: the host's cores split evenly
    # y > 1 FFN workers: "ep", "sliced", or chosen per layer pass (cluster/moe_parallel.py)
    moe_parallel: str = "adaptive"

    def __post_init__(self) -> None:
        if self.micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {self.micro_batches}")
        if self.moe_parallel not in MOE_PARALLEL_POLICIES:
            raise ValueError(f"moe_parallel must be one of {', '.join(MOE_PARALLEL_POLICIES)}, "
                             f"got {self.moe_parallel!r}")
        if self.transport not in ("gloo", "shm"):
            raise ValueError(f"transport must be gloo or shm, got {self.transport!r}")
        if self.afd is not None:
            self.num_attention_workers, self.num_ffn_workers = parse_afd_ratio(self.afd)

    @property
    def enabled(self) -> bool:
        return self.afd is not None


def parse_afd_ratio(text: str) -> tuple[int, int]:
    """'2A1F' -> (2, 1)."""
    upper = text.upper()
    a, sep, rest = upper.partition("A")
    f, sep2, tail = rest.partition("F")
    if not (sep and sep2 and not tail and a.isdigit() and f.isdigit() and int(a) > 0 and int(f) > 0):
        raise ValueError(f"afd must look like 1A1F (x attention workers, y FFN workers), got {text!r}")
    return int(a), int(f)


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        on_gpu = self.model.device != "cpu"
        if on_gpu and self.cache.kv_cache_dtype in ("int4", "saq"):
            raise ValueError(f"kv_cache_dtype {self.cache.kv_cache_dtype!r} keeps its staircase of stores on the "
                             f"host: use device 'cpu', or kv_cache_dtype auto, fp8_e4m3 or int8 on {self.model.device}")
        if on_gpu and self.parallel.enabled:
            raise ValueError(f"afd runs its workers on the CPU (the transports move host tensors); use device 'cpu' "
                             f"with afd, or drop afd to serve on {self.model.device}")
        if self.model.attention_backend == "triton" and self.cache.kv_cache_dtype in ("int4", "saq"):
            raise ValueError(f"attention_backend 'triton' reads full-precision, int8 or fp8_e4m3 KV; kv_cache_dtype "
                             f"{self.cache.kv_cache_dtype!r} (a staircase of stores) needs attention_backend 'torch'")
