"""`afdserve bench readme`: what refactoring a dense model into Read-ME's MoE costs in accuracy (models/readme.py),
and how an expert cache of C experts per layer fares on its routing (models/layers/expert_cache.py).

The dense model is refactored twice on the first `calibration_tokens` of English text (`pydoc_data.topics`): with
the pre-gating router left untrained and trained against the oracle labels (models/readme_router.py). Each is
scored with every expert on (the dense model, a check) and with top-k experts per token; perplexity is over
`eval_tokens` held-out tokens from the text's second half, one prefill each. No backbone fine-tuning (Read-ME
alternates router training with fine-tuning the model on about 1B tokens).

Expert cache: the trained router's top-1 choices for `cache_tokens` tokens of the text's second half, read by
`concurrency` streams at once (each step one token per stream, the streams at evenly spaced offsets), give the
access trace of each layer (one router: every layer sees the same trace). Hit rates for C = 1..E resident experts:
LRU; Belady seeing one step's worth of accesses ahead (about what decoding knows once a step's tokens are sampled);
Belady seeing the whole trace (the bound). Hit rates only: the cache is not yet in the FFN workers.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from afdserve.bench.kv_quant import english_text, perplexity
from afdserve.engine.llm import LLM
from afdserve.engine.tokenizer import Tokenizer
from afdserve.models.hf_config import load_transformer_config
from afdserve.models.layers.expert_cache import LRU, Belady, simulate, step_accesses
from afdserve.models.layers.pre_gating_router import PreGatingRouter
from afdserve.models.readme import router_sizes
from afdserve.models.readme_refactor import RefactorSpec, refactor_to_readme


@dataclass(frozen=True)
class ReadMEBenchSpec:
    refactor: RefactorSpec = RefactorSpec()
    top_ks: tuple[int, ...] = (1, 2)
    eval_tokens: int = 1024
    dtype: str = "float32"
    cache_tokens: int = 4096
    concurrencies: tuple[int, ...] = (1, 32)


def run_readme_bench(model_dir: Path, spec: ReadMEBenchSpec) -> dict:
    ids = Tokenizer(model_dir).encode(english_text())
    calibration = ids[:spec.refactor.calibration_tokens]
    start = max(len(ids) // 2, len(calibration))
    held_out = ids[start:start + spec.eval_tokens]
    if len(held_out) < 2:
        raise ValueError(f"the text has {len(ids)} tokens: none left to score after the calibration tokens")
    experts = spec.refactor.num_experts
    runs = [(None, 0, None)] + [(router, steps, k) for router, steps in
                                      (("untrained", 0), ("trained", spec.refactor.router_steps))
                                      for k in (experts, *spec.top_ks)]
    rows = []
    with (tempfile.TemporaryDirectory(prefix="afdserve-readme-") as tmp,
          tqdm(total=len(runs), desc="bench readme") as bar):
        refactored: dict[str, Path] = {}
        for router, steps, top_k in runs:
            path = Path(model_dir)
            if router is not None:
                if router not in refactored:
                    refactored[router] = refactor_to_readme(model_dir, Path(tmp) / router, calibration,
                                                            replace(spec.refactor, router_steps=steps))
                path = refactored[router]
                _set_top_k(path, top_k)
            with LLM(str(path), dtype=spec.dtype) as llm:
                ppl = perplexity(llm, held_out)
            row = dict(model="dense" if router is None else f"read-me, router {router}", top_k=top_k, perplexity=ppl)
            if router is not None:
                row["router_training"] = json.loads((path / "config.json").read_text())["readme_router_training"]
            rows.append(row)
            bar.update()
        cache_rows = expert_cache_rows(router_choices(refactored["trained"], ids[start:start + spec.cache_tokens]),
                                       experts, spec.concurrencies)
    for row in rows:
        row["vs_dense_pct"] = 100 * (row["perplexity"] / rows[0]["perplexity"] - 1)
    return dict(spec=dict(experts=experts, shared_fraction=spec.refactor.shared_fraction,
                          calibration_tokens=len(calibration), eval_tokens=len(held_out), eval_start=start,
                          router_steps=spec.refactor.router_steps, dtype=spec.dtype,
                          cache_tokens=spec.cache_tokens), rows=rows, cache_rows=cache_rows)


def router_choices(model_dir: Path, token_ids: list[int]) -> list[int]:
    """The saved pre-gating router's top-1 expert for each token."""
    cfg = load_transformer_config(model_dir)
    hidden, inter = router_sizes(cfg)
    router = PreGatingRouter(cfg.vocab_size, hidden, inter, cfg.raw["num_experts"], 1, cfg.rms_norm_eps)
    prefix = "model.pre_gating_router."
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:  # the router's tensors only
        router.load_state_dict({k.removeprefix(prefix): f.get_tensor(k).float() for k in f.keys()
                                if k.startswith(prefix)})
    with torch.no_grad():
        return router(torch.tensor(token_ids)).topk_ids[:, 0].tolist()


def expert_cache_rows(choices: list[int], experts: int, concurrencies: tuple[int, ...]) -> list[dict]:
    """Hit rates per concurrency, capacity and policy on the trace of `choices` read by that many streams."""
    rows = []
    for concurrency in concurrencies:
        steps_per_stream = len(choices) // concurrency
        steps = [[choices[s * steps_per_stream + t] for s in range(concurrency)] for t in range(steps_per_stream)]
        trace = step_accesses(steps)
        next_step = max(len(set(step)) for step in steps)  # at most one step's accesses ahead
        for capacity in range(1, experts + 1):
            for policy, lookahead in (("lru", None), ("belady, next step", next_step), ("belady, whole trace", None)):
                stats = simulate(trace, capacity, LRU() if policy == "lru" else Belady(), lookahead)
                rows.append(dict(concurrency=concurrency, capacity=capacity, policy=policy, hit_rate=stats.hit_rate,
                                 accesses=len(trace), experts_per_step=len(trace) / len(steps)))
    return rows


def _set_top_k(model_dir: Path, top_k: int) -> None:
    """The refactored checkpoint's experts per token (config.json's moe_top_k)."""
    config = json.loads((model_dir / "config.json").read_text())
    config["moe_top_k"] = top_k
    (model_dir / "config.json").write_text(json.dumps(config, indent=1))


def format_readme_result(result: dict) -> str:
    spec = result["spec"]
    header = f"{'model':<28} {'experts/token':>13} {'perplexity':>10} {'vs dense':>9} {'router acc':>10}"
    lines = [header, "-" * len(header)]
    for r in result["rows"]:
        k = "-" if r["top_k"] is None else f"{r['top_k']} of {spec['experts']}"
        accuracy = r.get("router_training", {}).get("oracle_accuracy")
        lines.append(f"{r['model']:<28} {k:>13} {r['perplexity']:>10.3f} {r['vs_dense_pct']:>+8.1f}% "
                     f"{'' if accuracy is None else f'{accuracy:.3f}':>10}")
    lines.append(f"perplexity over {spec['eval_tokens']} held-out tokens (from token {spec['eval_start']}); "
                 f"refactored on the first {spec['calibration_tokens']}; {spec['experts']} experts + "
                 f"{spec['shared_fraction']:.0%} shared channels; router trained {spec['router_steps']} steps "
                 f"(accuracy: its top-1 against the oracle labels on the calibration tokens, chance "
                 f"{1 / spec['experts']:.3f}); {spec['dtype']}")
    if result.get("cache_rows"):
        concurrencies = sorted({r["concurrency"] for r in result["cache_rows"]})
        policies = list(dict.fromkeys(r["policy"] for r in result["cache_rows"]))
        lines += ["", "expert cache hit rate (C resident experts per layer; trained router, top-1)"]
        for concurrency in concurrencies:
            rows = [r for r in result["cache_rows"] if r["concurrency"] == concurrency]
            lines.append(f"concurrency {concurrency} ({rows[0]['experts_per_step']:.2f} distinct experts per step, "
                         f"{rows[0]['accesses']} accesses)")
            lines.append(f"{'C':>3} " + " ".join(f"{p:>20}" for p in policies))
            for capacity in sorted({r["capacity"] for r in rows}):
                rates = {r["policy"]: r["hit_rate"] for r in rows if r["capacity"] == capacity}
                lines.append(f"{capacity:>3} " + " ".join(f"{rates[p]:>20.3f}" for p in policies))
    return "\n".join(lines)
