"""KV cache quantization quality: perplexity per --kv-cache-dtype on English text from the stdlib, and KV bytes.

The text is `pydoc_data.topics` (Python's help topics), its topics joined in sorted order, the first `num_tokens`
tokens. It is fed as one prompt with prompt logprobs, in prefill chunks of `chunk` tokens
(max_num_batched_tokens), so every chunk attends to the cached (quantized) KV of the chunks before it; in the torch
backend a chunk also reads its own tokens back from the cache. The perplexity is exp(-mean log p(token | prefix))
over all positions after the first.

KV bytes per token: the floor format's bytes of one block over all layers / block size. The int4 / saq window and
stair pools are a fixed cost per running sequence on top (KVCacheSpec.pool_bytes), printed per max_num_seqs.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from afdserve.engine.config import CACHE_DEFAULTS, EngineConfig
from afdserve.engine.llm import LLM
from afdserve.engine.model_runner import kv_cache_spec_for
from afdserve.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class KVQuantBenchSpec:
    kv_dtypes: tuple[str, ...] = ("auto", "fp8_e4m3", "int8", "int4", "saq")
    num_tokens: int = 2048
    chunk: int = 256
    kv_window: int = CACHE_DEFAULTS["kv_window"]  # int4's row only
    kv_staircase: str = CACHE_DEFAULTS["kv_staircase"]  # saq's row only


def english_text() -> str:
    from pydoc_data.topics import topics
    return "\n\n".join(topics[name] for name in sorted(topics))


def perplexity(llm: LLM, token_ids: list[int]) -> float:
    out = llm.generate([token_ids], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    logprobs = [out.prompt_logprobs[p][token_ids[p]].logprob for p in range(1, len(token_ids))]
    return math.exp(-sum(logprobs) / len(logprobs))


def run_kv_quant_bench(config: EngineConfig, spec: KVQuantBenchSpec) -> list[dict]:
    """One row per KV dtype: perplexity, its change against the first dtype's (put "auto" first), bytes."""
    rows = []
    token_ids = None
    for kv_dtype in spec.kv_dtypes:
        own = dict(kv_window=spec.kv_window if kv_dtype == "int4" else CACHE_DEFAULTS["kv_window"],
                   kv_staircase=spec.kv_staircase if kv_dtype == "saq" else CACHE_DEFAULTS["kv_staircase"])
        cache = dataclasses.replace(config.cache, kv_cache_dtype=kv_dtype, enable_prefix_caching=False, **own)
        cfg = dataclasses.replace(
            config, cache=cache,
            scheduler=dataclasses.replace(config.scheduler, max_num_batched_tokens=spec.chunk))
        with LLM(config=cfg) as llm:
            if token_ids is None:
                token_ids = llm.tokenizer.encode(english_text())[:spec.num_tokens]
            kv_spec = kv_cache_spec_for(cfg, llm.engine.model_config)
            rows.append(dict(kv_dtype=kv_dtype, perplexity=perplexity(llm, token_ids), tokens=len(token_ids),
                             kv_bytes_per_token=kv_spec.block_bytes / cfg.cache.block_size,
                             pool_mib=kv_spec.pool_bytes / 2**20, num_kv_blocks=llm.engine.num_kv_blocks))
    for row in rows:
        row["delta_pct"] = 100 * (row["perplexity"] / rows[0]["perplexity"] - 1)
    return rows


def format_kv_quant_result(rows: list[dict], config: EngineConfig, spec: KVQuantBenchSpec) -> str:
    lines = [f"{'kv dtype':<10} {'perplexity':>10} {'delta':>8} {'KV bytes/token':>15} {'window+stairs MiB':>18}",
             "-" * 65]
    for r in rows:
        lines.append(f"{r['kv_dtype']:<10} {r['perplexity']:>10.4f} {r['delta_pct']:>+7.2f}% "
                     f"{r['kv_bytes_per_token']:>15.0f} {r['pool_mib']:>18.1f}")
    lines.append(f"{rows[0]['tokens']} tokens of pydoc_data.topics in prefill chunks of {spec.chunk}; block "
                 f"{config.cache.block_size}, int4 window {spec.kv_window}, saq {spec.kv_staircase}; "
                 f"window+stairs sized for max_num_seqs={config.scheduler.max_num_seqs}")
    return "\n".join(lines)
