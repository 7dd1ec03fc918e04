"""Weight-only quantization quality: perplexity per --quantization on English text from the stdlib, and weight bytes.

The text and the perplexity are bench/kv_quant.py's (pydoc_data.topics, prefilled in chunks with prompt logprobs);
only the weights change between rows, the KV cache stays in the model dtype. Under `--afd` (e.g. with
`--afd-wire fp8`) the rows run on the AFD workers. Speed is a separate run of
`afdserve bench throughput --quantization int8|int4 --concurrency 1` (batch-1 TPOT), since the two want different loads.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from afdserve.bench.kv_quant import english_text, perplexity
from afdserve.engine.config import EngineConfig
from afdserve.engine.llm import LLM
from afdserve.models.loader import weight_bytes


@dataclass(frozen=True)
class WeightQuantBenchSpec:
    quantizations: tuple[str | None, ...] = (None, "int8")  # None: the model dtype, the baseline of the delta
    num_tokens: int = 2048
    chunk: int = 256


def run_weight_quant_bench(config: EngineConfig, spec: WeightQuantBenchSpec) -> list[dict]:
    """One row per quantization: perplexity, its change against the first row's, and the weights' bytes."""
    rows = []
    token_ids = None
    for quantization in spec.quantizations:
        cfg = dataclasses.replace(
            config, model=dataclasses.replace(config.model, quantization=quantization),
            cache=dataclasses.replace(config.cache, enable_prefix_caching=False),
            scheduler=dataclasses.replace(config.scheduler, max_num_batched_tokens=spec.chunk))
        with LLM(config=cfg) as llm:
            if token_ids is None:
                token_ids = llm.tokenizer.encode(english_text())[:spec.num_tokens]
            rows.append(dict(quantization=quantization or "none", perplexity=perplexity(llm, token_ids),
                             tokens=len(token_ids), weight_mib=_weight_bytes(llm.engine.core.executor) / 2**20))
    for row in rows:
        row["delta_pct"] = 100 * (row["perplexity"] / rows[0]["perplexity"] - 1)
    return rows


def _weight_bytes(executor) -> int:
    """The model's parameter bytes: the local runner's, or summed over the AFD workers (each holds its side)."""
    if hasattr(executor, "worker_weight_bytes"):
        return sum(sum(per_role) for per_role in executor.worker_weight_bytes().values())
    return weight_bytes(executor.runner.model)


def format_weight_quant_result(rows: list[dict], config: EngineConfig, spec: WeightQuantBenchSpec) -> str:
    lines = [f"{'quantization':<13} {'perplexity':>10} {'delta':>8} {'weights MiB':>12}", "-" * 46]
    for r in rows:
        lines.append(f"{r['quantization']:<13} {r['perplexity']:>10.4f} {r['delta_pct']:>+7.2f}% "
                     f"{r['weight_mib']:>12.1f}")
    lines.append(f"{rows[0]['tokens']} tokens of pydoc_data.topics in prefill chunks of {spec.chunk}; "
                 f"dtype {config.model.dtype}; weights MiB: the parameters as loaded (embedding table included)")
    return "\n".join(lines)
