"""MoE layer micro-benchmark: tokens/s of one MoE FFN (router + routed experts, the CPU torch path of kernels/moe)
against the number of tokens in the step, per dtype.

Default shape: Mixtral-8x7B scaled down 8x in width so that it runs on a laptop-class CPU:
    Mixtral-8x7B  hidden 4096, expert intermediate 14336, 8 experts, top-2 (renormalized softmax)
    this bench    hidden  512, expert intermediate  1792, 8 experts, top-2   (~22 M expert parameters)
Random weights (std 0.02) and random inputs; the routing is therefore roughly balanced. Each point is the median of
`repeats` timed calls after one warm-up call. FLOPs counted: 2 * k * 3 * H * I per token (the experts' three GEMMs).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from afdserve.models.layers.linear import Linear
from afdserve.models.layers.moe import MoEBlock
from afdserve.models.layers.moe_router import Router, RouterConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class MoEBenchSpec:
    hidden_size: int = 512
    intermediate_size: int = 1792
    num_experts: int = 8
    top_k: int = 2
    tokens: tuple[int, ...] = (1, 8, 32, 128, 512, 2048)
    dtypes: tuple[str, ...] = ("bfloat16", "float32")
    repeats: int = 5
    seed: int = 0


def build_layer(spec: MoEBenchSpec, dtype: torch.dtype) -> tuple[Router, MoEBlock]:
    torch.manual_seed(spec.seed)
    router = Router(spec.hidden_size, RouterConfig(spec.num_experts, spec.top_k, renormalize=True))
    block = MoEBlock(spec.hidden_size, spec.num_experts, spec.intermediate_size)
    for module in (router, block):
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0.0, 0.02)
        module.to(dtype).eval()
        for m in module.modules():
            if isinstance(m, Linear):
                m.prepare_for_inference()
    return router, block


def time_layer(router: Router, block: MoEBlock, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of one router + experts call on x."""
    times = []
    with torch.inference_mode():
        block(x, router(x))  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            block(x, router(x))
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_moe_bench(spec: MoEBenchSpec) -> dict:
    flops_per_token = 2 * spec.top_k * 3 * spec.hidden_size * spec.intermediate_size
    rows = []
    for name in spec.dtypes:
        dtype = _DTYPES[name]
        router, block = build_layer(spec, dtype)
        for n in spec.tokens:
            x = torch.randn(n, spec.hidden_size, generator=torch.Generator().manual_seed(n)).to(dtype)
            seconds = time_layer(router, block, x, spec.repeats)
            rows.append(dict(dtype=name, tokens=n, median_ms=seconds * 1e3, tokens_per_s=n / seconds,
                             gflops=n * flops_per_token / seconds / 1e9))
    return dict(spec={**asdict(spec), "threads": torch.get_num_threads()}, results=rows)


def format_moe_result(result: dict) -> str:
    s = result["spec"]
    lines = [f"MoE layer: H={s['hidden_size']} I={s['intermediate_size']} E={s['num_experts']} top-{s['top_k']}, "
             f"torch CPU path, {s['threads']} threads, median of {s['repeats']}",
             f"{'dtype':>9} {'tokens':>7} {'median ms':>10} {'tokens/s':>11} {'GFLOP/s':>8}"]
    for r in result["results"]:
        lines.append(f"{r['dtype']:>9} {r['tokens']:>7} {r['median_ms']:>10.3f} {r['tokens_per_s']:>11.1f} "
                     f"{r['gflops']:>8.1f}")
    return "\n".join(lines)
