"""The engine's arguments as CLI flags, shared by every subcommand that builds an engine."""
from __future__ import annotations

import argparse
from pathlib import Path

from afdserve.engine.config import KV_CACHE_DTYPES, MOE_PARALLEL_POLICIES, EngineConfig
from afdserve.engine.llm import engine_config
from afdserve.kernels.attention import ATTENTION_BACKENDS


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default="smollm2", help="alias 'smollm2', a .gguf file, or an HF model directory")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--seed", type=int, default=0, help="seed for requests without their own")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--kv-cache-memory-gb", type=float, default=1.0)
    g.add_argument("--num-kv-blocks", type=int, default=None, help="overrides --kv-cache-memory-gb")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES),
                   help="KV cache storage: the model dtype, fp8/int8 per token, int4 (KIVI) or saq (staircase)")
    g.add_argument("--kv-window", type=int, default=128, help="int4: newest tokens kept in full precision")
    g.add_argument("--kv-staircase", default="128:16,256:8,384:4,inf:2",
                   help="saq: age:bits stairs; blocks older than an age step down to the next stair's bits")
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--cache-dir", type=Path, default=None, help="default: $AFDSERVE_CACHE or ~/.cache/afdserve")
    g.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS,
                   help="auto: Triton kernels on CUDA, torch on CPU")
    g.add_argument("--device", default="auto", help="auto (cuda when torch sees a GPU, else cpu), cpu, cuda, cuda:N")
    a = parser.add_argument_group("attention-FFN disaggregation")
    a.add_argument("--afd", default=None, metavar="xAyF", help="run x attention and y FFN workers on Ray, e.g. 1A1F")
    a.add_argument("--micro-batches", type=int, default=2)
    a.add_argument("--ray-address", default=None, help="default: start a local Ray; 'auto' joins a running one")
    a.add_argument("--afd-transport", default="gloo", choices=["gloo", "shm"])
    a.add_argument("--moe-parallel", default="adaptive", choices=MOE_PARALLEL_POLICIES,
                   help="with several FFN workers, how MoE experts run: expert-parallel, expert-sliced, or chosen "
                        "per layer pass from the routed load")
    a.add_argument("--threads-per-worker", type=int, default=None)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return engine_config(
        model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, seed=args.seed,
        block_size=args.block_size, kv_cache_memory_gb=args.kv_cache_memory_gb, num_kv_blocks=args.num_kv_blocks,
        enable_prefix_caching=args.enable_prefix_caching, kv_cache_dtype=args.kv_cache_dtype,
        kv_window=args.kv_window, kv_staircase=args.kv_staircase, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, cache_dir=args.cache_dir, afd=args.afd,
        micro_batches=args.micro_batches, ray_address=args.ray_address, afd_transport=args.afd_transport,
        threads_per_worker=args.threads_per_worker, attention_backend=args.attention_backend,
        moe_parallel=args.moe_parallel, device=args.device)
