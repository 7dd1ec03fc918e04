"""Engine configuration: one typed config built at the entry point (LLM, CLI, server) and passed down.

Each field below is declared once and is also an engine argument under the same flat name: the keyword
`LLM(kv_cache_dtype=...)` / `engine_config(...)`, and the CLI flag `--kv-cache-dtype` (engine/arg_utils.py).
Its default, type and help (with any choices or metavar for the CLI, in the field's metadata) serve all three.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from afdserve.kernels.attention import ATTENTION_BACKENDS
from afdserve.models.layers.expert_cache import EXPERT_CACHE_POLICIES
from afdserve.kernels.attention.sparse.registry import POLICY_NAMES, make_policy, parse_policy_params


def option(default: Any, help: str, **cli: Any) -> Any:
    """A config field that is also an engine argument; `cli` holds extra argparse keywords (choices, metavar)."""
    return field(default=default, metadata={"help": help, **cli})


DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("int8", "int4", "fp8")
CPU_QUANTIZATIONS = ("int8", "int4")  # torch's weight-only CPU kernels; fp8 runs anywhere (torch._scaled_mm)


@dataclass
class ModelConfig:
    model: str = option("smollm2", "alias 'smollm2', a .gguf file, or an HF model directory")
    dtype: str = option("auto", "weights and activations; auto: the checkpoint's", choices=DTYPES)
    max_model_len: int | None = option(None, "most tokens of prompt and output; default: the model's context length")
    seed: int = option(0, "seed for requests without their own")
    cache_dir: Path | None = option(None, "where imported GGUF models live; default: $AFDSERVE_CACHE or "
                                          "~/.cache/afdserve")
    attention_backend: str = option("auto", "auto: Triton kernels on CUDA, torch on CPU", choices=ATTENTION_BACKENDS)
    # Resolved in __post_init__, so a config always names a concrete device.
    device: str = option("auto", "auto (cuda when torch sees a GPU, else cpu), cpu, cuda, cuda:N")
    quantization: str | None = option(None, "quantization of the linear layers and the LM head: int8 (weight-only, "
                                            "per-channel scales; CPU) or int4 (weight-only, a scale and zero per 32 "
                                            "input channels, for small batches; CPU), or fp8 (e4m3 weights with "
                                            "per-channel scales and activations with per-token scales, for Hopper; "
                                            "the LM head stays as it is); MoE router gates and experts keep the "
                                            "model dtype",
                                      choices=QUANTIZATIONS)
    attention_policy: str = option("dense", "which KV pages a decode query reads: dense (every page), or a sparse "
                                            "policy (kernels/attention/sparse); hyperattention also approximates "
                                            "prefills over min_seq_len tokens",
                                   choices=POLICY_NAMES)
    # A JSON text from the CLI; from Python, a dict as well (kernels/attention/sparse/registry.parse_policy_params).
    attention_policy_config: str | None = option(None, "the policy's parameters as a JSON object, e.g. "
                                                       "'{\"budget_pages\": 32}'; default: the policy's own",
                                                 metavar="JSON")

    # A comma-separated text from the CLI ("1,2,4,8"); from Python, a list of ints as well.
    cuda_graph_sizes: str | None = option(None, "decode batch sizes captured as CUDA graphs (CUDA only), e.g. "
                                                "1,2,4,8; a decode step of n requests replays the smallest size >= n; "
                                                "default: 1,2,4,8,16,24,32,48,64,96,128,192,256 up to max_num_seqs",
                                          metavar="N,N,...")
    enforce_eager: bool = option(False, "run every step eagerly: capture no CUDA graphs")
    expert_cache_size: int | None = option(None, "MoE experts kept in memory per layer; the others are memory-mapped "
                                                 "from disk and loaded on use (CPU); default: every expert resident")
    expert_cache_policy: str = option("belady", "which resident expert a load evicts: belady (next use farthest "
                                                "in the known routing) or lru", choices=EXPERT_CACHE_POLICIES)

    def __post_init__(self) -> None:
        self.device = resolve_device(self.device)
        parse_cuda_graph_sizes(self.cuda_graph_sizes)  # a bad list fails here
        if self.expert_cache_policy not in EXPERT_CACHE_POLICIES:
            raise ValueError(f"expert_cache_policy must be one of {', '.join(EXPERT_CACHE_POLICIES)}, "
                             f"got {self.expert_cache_policy!r}")
        if self.expert_cache_size is None and self.expert_cache_policy != "belady":
            raise ValueError("expert_cache_policy: set, but read only with expert_cache_size; set expert_cache_size "
                             "or leave expert_cache_policy out")
        if self.expert_cache_size is not None and self.expert_cache_size < 1:
            raise ValueError(f"expert_cache_size must be >= 1, got {self.expert_cache_size}")
        if self.expert_cache_size is not None and self.device != "cpu":
            raise ValueError(f"expert_cache_size keeps the resident experts in host memory (CPU); leave it unset on "
                             f"{self.device}")
        if self.attention_policy_config is not None and self.attention_policy == "dense":
            raise ValueError("attention_policy_config: set, but attention_policy is 'dense', which takes none; name "
                             "a sparse policy or leave it out")
        make_policy(self.attention_policy, self.attention_policy_config)  # a bad name or parameter fails here
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                             f"got {self.attention_backend!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)} (or None), "
                             f"got {self.quantization!r}")
        if self.quantization in CPU_QUANTIZATIONS and self.device != "cpu":
            raise ValueError(f"quantization {self.quantization!r} is a CPU path (torch's weight-only CPU kernels); "
                             f"leave it unset on {self.device}")
        if (self.quantization == "fp8" and self.device != "cpu"
                and torch.cuda.get_device_capability(self.device) < (8, 9)):
            raise ValueError(f"quantization 'fp8' needs FP8 tensor cores (compute capability 8.9+: Ada, Hopper); "
                             f"{self.device} is {torch.cuda.get_device_name(self.device)}")

    @property
    def expert_cache(self) -> tuple[int, str] | None:
        """(experts resident per layer, eviction policy), or None: every expert resident."""
        return None if self.expert_cache_size is None else (self.expert_cache_size, self.expert_cache_policy)

    @property
    def attention_policy_spec(self) -> dict:
        """The engine's attention policy as a request names one: {"name": ..., parameters...}."""
        return {"name": self.attention_policy, **parse_policy_params(self.attention_policy_config)}


DEFAULT_CUDA_GRAPH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def parse_cuda_graph_sizes(sizes: str | list[int] | None) -> tuple[int, ...]:
    """--cuda-graph-sizes as sorted distinct batch sizes; None: DEFAULT_CUDA_GRAPH_SIZES."""
    if sizes is None:
        return DEFAULT_CUDA_GRAPH_SIZES
    try:
        values = [int(v) for v in (sizes.split(",") if isinstance(sizes, str) else sizes)]
    except (TypeError, ValueError):
        raise ValueError(f"cuda_graph_sizes must be batch sizes like 1,2,4,8, got {sizes!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"cuda_graph_sizes must be batch sizes >= 1 like 1,2,4,8, got {sizes!r}")
    return tuple(sorted(set(values)))


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


KV_CACHE_DTYPES = ("auto", "fp8_e4m3", "int8", "int4", "saq")
STAIR_BITS = (16, 8, 4, 2)


@dataclass
class CacheConfig:
    block_size: int = option(16, "tokens per KV block: 8, 16, 32, 64 or 128")
    kv_cache_memory_gb: float = option(1.0, "KV pool size in GB; --num-kv-blocks overrides it")
    num_kv_blocks: int | None = option(None, "KV pool size in blocks; overrides --kv-cache-memory-gb")
    enable_prefix_caching: bool = option(True, "reuse the KV blocks of a prompt prefix computed before")
    kv_cache_dtype: str = option("auto", "KV cache storage: the model dtype, fp8/int8 per token, int4 (KIVI) or saq "
                                         "(staircase)", choices=KV_CACHE_DTYPES)
    kv_window: int = option(128, "int4: newest tokens kept in full precision (KIVI's R)")
    # SAQ's own example ladder (128:16,256:8,384:4,inf:2) reaches 2 bits after 384 tokens: +6% perplexity on SmolLM2
    # at 2,048 tokens, +9% at 4,096. Stopping at 4 bits keeps saq within int8's and int4's accuracy.
    kv_staircase: str = option("128:16,512:8,inf:4", "saq: age:bits stairs; blocks older than an age step down to "
                                                     "the next stair's bits")

    def __post_init__(self) -> None:
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be one of 8, 16, 32, 64, 128, got {self.block_size}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.kv_window < 0:
            raise ValueError(f"kv_window must be >= 0, got {self.kv_window}")
        parse_staircase(self.kv_staircase)
        # A setting its format does not read is refused, not ignored (a value equal to the default can't be told).
        for name, dtype in (("kv_window", "int4"), ("kv_staircase", "saq")):
            if getattr(self, name) != CACHE_DEFAULTS[name] and self.kv_cache_dtype != dtype:
                raise ValueError(f"{name}: set, but read only with kv_cache_dtype {dtype!r} (got "
                                 f"{self.kv_cache_dtype!r}); set kv_cache_dtype {dtype} or leave {name} out")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")

    @property
    def stairs(self) -> list[tuple[float, int]]:
        """kv_staircase as [(age, bits), ...], checked in __post_init__."""
        return parse_staircase(self.kv_staircase)


CACHE_DEFAULTS = {f.name: f.default for f in fields(CacheConfig)}


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
    max_num_seqs: int = option(256, "most requests running at once")
    max_num_batched_tokens: int = option(2048, "most tokens computed in one step (the chunked-prefill budget)")
    tpot_slo_ms: float | None = option(None, "keep running requests' time per output token under this: a model of "
                                             "step time, fitted from the engine's own steps, caps the batch and the "
                                             "prefill chunk, and requests beyond it wait; default: no cap")

    expert_batch_size: int | None = option(None, "pre-gated MoE (Read-ME) models: at most this many decodes per step, "
                                                 "chosen to share experts (the router's choice for each request's "
                                                 "next token); default: every ready decode runs")
    expert_batch_max_wait: int = option(4, "expert batching: steps a ready decode may be held back before it goes "
                                           "first")

    def __post_init__(self) -> None:
        if self.expert_batch_size is not None and self.expert_batch_size < 1:
            raise ValueError(f"expert_batch_size must be >= 1, got {self.expert_batch_size}")
        if self.expert_batch_max_wait < 0:
            raise ValueError(f"expert_batch_max_wait must be >= 0, got {self.expert_batch_max_wait}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.tpot_slo_ms is not None and not (math.isfinite(self.tpot_slo_ms) and self.tpot_slo_ms > 0):
            raise ValueError(f"tpot_slo_ms must be a positive number of milliseconds, got {self.tpot_slo_ms}")


MOE_PARALLEL_POLICIES = ("ep", "sliced", "adaptive")  # cluster/moe_parallel.py
AFD_TRANSPORTS = ("gloo", "shm", "nccl")  # cluster/transport.py
EXECUTOR_BACKENDS = ("ray", "mp")  # cluster/actors.py
AFD_WIRES = ("auto", "fp8")  # cluster/wire.py


@dataclass
class ParallelConfig:
    """Attention-FFN disaggregation: `afd="1A1F"` runs x attention workers and y FFN workers as Ray actors or local
    processes."""
    afd: str | None = option(None, "run x attention and y FFN workers, e.g. 1A1F; default: the whole model in this "
                                   "process", metavar="xAyF")
    micro_batches: int = option(2, "micro-batches in flight per step, so FFN work on one overlaps attention on the "
                                   "next")
    distributed_executor_backend: str = option("ray", "where the AFD workers run: ray (Ray actors, any nodes) or mp "
                                                      "(local processes, one host, no Ray)",
                                               choices=EXECUTOR_BACKENDS)
    ray_address: str | None = option(None, "default: start a local Ray; 'auto' joins a running one")
    afd_transport: str = option("gloo", "the A<->F data plane: gloo (torch.distributed, any hosts), shm (shared "
                                        "memory, one host) or nccl (GPU to GPU, one GPU per worker)",
                                choices=AFD_TRANSPORTS)
    afd_wire: str = option("auto", "A->F activations on the wire: auto (the model dtype) or fp8 (e4m3 with a scale "
                                   "per token: half of bf16's bytes, as Step-3 deploys; an approximation, its "
                                   "perplexity cost in the README)", choices=AFD_WIRES)
    threads_per_worker: int | None = option(None, "torch threads per worker; default: the host's cores split evenly")
    moe_parallel: str = option("adaptive", "with several FFN workers, how MoE experts run: expert-parallel, "
                                           "expert-sliced, or chosen per layer pass from the routed load",
                               choices=MOE_PARALLEL_POLICIES)

    def __post_init__(self) -> None:
        if self.micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {self.micro_batches}")
        if self.moe_parallel not in MOE_PARALLEL_POLICIES:
            raise ValueError(f"moe_parallel must be one of {', '.join(MOE_PARALLEL_POLICIES)}, "
                             f"got {self.moe_parallel!r}")
        if self.afd_transport not in AFD_TRANSPORTS:
            raise ValueError(f"afd_transport must be one of {', '.join(AFD_TRANSPORTS)}, got {self.afd_transport!r}")
        if self.distributed_executor_backend not in EXECUTOR_BACKENDS:
            raise ValueError(f"distributed_executor_backend must be one of {', '.join(EXECUTOR_BACKENDS)}, got "
                             f"{self.distributed_executor_backend!r}")
        if self.distributed_executor_backend == "mp" and self.ray_address is not None:
            raise ValueError(f"ray_address {self.ray_address!r} joins a Ray cluster, but distributed_executor_backend "
                             f"'mp' runs the workers as local processes (use 'ray', or leave ray_address out)")
        if self.afd_wire not in AFD_WIRES:
            raise ValueError(f"afd_wire must be one of {', '.join(AFD_WIRES)}, got {self.afd_wire!r}")
        # A setting that would change nothing is refused, not ignored (a value equal to the default can't be told).
        if self.afd is None:
            unused = [f.name for f in fields(self) if f.name != "afd" and getattr(self, f.name) != f.default]
            if unused:
                raise ValueError(f"{', '.join(unused)}: set, but used only with afd (e.g. afd='1A1F', --afd 1A1F); "
                                 f"set afd or leave them out")
        elif parse_afd_ratio(self.afd)[1] == 1 and self.moe_parallel != "adaptive":
            raise ValueError(f"moe_parallel {self.moe_parallel!r} chooses how several FFN workers share the experts; "
                             f"afd {self.afd} has one FFN worker (use xAyF with y > 1, or leave it out)")

    @property
    def enabled(self) -> bool:
        return self.afd is not None

    @property
    def num_attention_workers(self) -> int:
        """x of xAyF; 0 without afd, where no worker runs (the whole model is in the engine's process)."""
        return parse_afd_ratio(self.afd)[0] if self.enabled else 0

    @property
    def num_ffn_workers(self) -> int:
        """y of xAyF; 0 without afd."""
        return parse_afd_ratio(self.afd)[1] if self.enabled else 0


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
        par = self.parallel
        if on_gpu and par.enabled and par.distributed_executor_backend == "ray":
            # Ray hides GPUs from actors that reserve none, and reserving them is not built: local processes see them.
            raise ValueError(f"afd on {self.model.device} runs its workers as local processes: add "
                             f"distributed_executor_backend 'mp' (--distributed-executor-backend mp)")
        if par.enabled and par.afd_transport == "nccl":
            workers = par.num_attention_workers + par.num_ffn_workers
            gpus = torch.cuda.device_count() if on_gpu else 0
            if self.model.device != "cuda" or gpus < workers:
                raise ValueError(f"afd_transport 'nccl' needs a GPU per worker (device 'cuda', {workers} GPUs for "
                                 f"afd {par.afd}); this is device {self.model.device!r} with {gpus} GPU(s): use "
                                 f"afd_transport shm (one host) or gloo")
        if self.scheduler.expert_batch_size is not None and self.parallel.num_attention_workers > 1:
            raise ValueError(f"expert_batch_size picks one scheduler's decodes; afd {self.parallel.afd} schedules "
                             f"{self.parallel.num_attention_workers} attention ranks (use x = 1, or leave it out)")
        if self.scheduler.tpot_slo_ms is not None and self.parallel.num_attention_workers > 1:
            raise ValueError(f"tpot_slo_ms caps one scheduler's batch; afd {self.parallel.afd} schedules "
                             f"{self.parallel.num_attention_workers} attention ranks (use x = 1, or leave it out)")
        if self.model.expert_cache_size is not None and self.parallel.num_ffn_workers > 1:
            raise ValueError(f"expert_cache_size caches whole experts, which FFN sharding slices; afd "
                             f"{self.parallel.afd} has {self.parallel.num_ffn_workers} FFN workers (use y = 1)")
        if self.model.quantization == "int4" and self.parallel.num_ffn_workers > 1:
            raise ValueError(f"quantization 'int4' packs groups of input channels that FFN sharding would split; afd "
                             f"{self.parallel.afd} has {self.parallel.num_ffn_workers} FFN workers (use y = 1, or int8)")
        if self.model.attention_policy != "dense" and self.cache.kv_cache_dtype in ("int4", "saq"):
            raise ValueError(f"attention_policy {self.model.attention_policy!r} picks KV blocks by id, which the "
                             f"staircase of kv_cache_dtype {self.cache.kv_cache_dtype!r} moves between stores; use "
                             f"kv_cache_dtype auto, fp8_e4m3 or int8 with it")
        if self.model.attention_backend == "triton" and self.cache.kv_cache_dtype in ("int4", "saq"):
            raise ValueError(f"attention_backend 'triton' reads full-precision, int8 or fp8_e4m3 KV; kv_cache_dtype "
                             f"{self.cache.kv_cache_dtype!r} (a staircase of stores) needs attention_backend 'torch'")


def engine_sections() -> dict[str, type]:
    """EngineConfig's section configs by attribute name: {"model": ModelConfig, "cache": CacheConfig, ...}."""
    return {section.name: section.default_factory for section in fields(EngineConfig)}


def engine_arg_sections() -> dict[str, str]:
    """Every engine argument's flat name -> the section that declares it, in declaration order. The names are
    unique across sections (the CLI would refuse a second flag of the same name)."""
    return {f.name: name for name, config_class in engine_sections().items() for f in fields(config_class)}


def engine_config(model: str = ModelConfig.model, **engine_args: Any) -> EngineConfig:
    """The engine arguments as flat keywords (what LLM and the CLI take), each given to the section that declares it.

    `model` stays the one positional argument, as `LLM("smollm2")` and `engine_config(path)` pass it."""
    engine_args["model"] = model
    section_of = engine_arg_sections()
    unknown = sorted(engine_args.keys() - section_of.keys())
    if unknown:
        raise TypeError(f"unknown engine argument(s) {', '.join(map(repr, unknown))}; "
                        f"the engine takes {', '.join(section_of)}")
    sections = engine_sections()
    by_section: dict[str, dict[str, Any]] = {name: {} for name in sections}
    for arg, value in engine_args.items():
        by_section[section_of[arg]][arg] = value
    return EngineConfig(**{name: config_class(**by_section[name]) for name, config_class in sections.items()})
