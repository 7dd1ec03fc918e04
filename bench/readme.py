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
Belady seeing the whole trace (the bound).

Step latency: the trained top-1 model served with --expert-cache-size C (the rest memory-mapped from disk, loaded on
a miss, or ahead by the prefetch thread from the pre-gating router's choice while earlier layers compute) and each
policy, at each concurrency: that many requests of `latency_prompt_tokens` held-out text tokens, each decoding
`latency_output_tokens` greedily; the median time of the steps that decode only, the cache's hit rate over them and
its seconds spent loading experts, and the decode tokens per second; at the middle C also with the prefetch thread
forced on (the engine starts it only where a core is spare), and with expert-aware batching (--expert-batch-size:
half the streams per step, chosen to share experts). Each setting runs `latency_repeats` times, round robin; the
medians of the runs are reported.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from afdserve.bench.kv_quant import english_text, perplexity
from afdserve.engine.llm import LLM
from afdserve.engine.sampling_params import SamplingParams
from afdserve.engine.tokenizer import Tokenizer
from afdserve.models.layers.expert_cache import LRU, Belady, simulate, step_accesses
from afdserve.models.readme import load_pre_gating_router
from afdserve.models.readme_refactor import RefactorSpec, refactor_to_readme


@dataclass(frozen=True)
class ReadMEBenchSpec:
    refactor: RefactorSpec = RefactorSpec()
    top_ks: tuple[int, ...] = (1, 2)
    eval_tokens: int = 1024
    dtype: str = "float32"
    cache_tokens: int = 4096
    concurrencies: tuple[int, ...] = (1, 32)
    latency_capacities: tuple[int, ...] = (2, 4, 6)  # C for the step-latency rows (and every expert resident)
    latency_prompt_tokens: int = 32
    latency_output_tokens: int = 48
    latency_repeats: int = 2


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
        _set_top_k(refactored["trained"], 1)
        latency_rows = step_latency_rows(refactored["trained"], ids[start:], spec)
    for row in rows:
        row["vs_dense_pct"] = 100 * (row["perplexity"] / rows[0]["perplexity"] - 1)
    return dict(spec=dict(experts=experts, shared_fraction=spec.refactor.shared_fraction,
                          calibration_tokens=len(calibration), eval_tokens=len(held_out), eval_start=start,
                          router_steps=spec.refactor.router_steps, dtype=spec.dtype,
                          cache_tokens=spec.cache_tokens, latency_prompt_tokens=spec.latency_prompt_tokens,
                          latency_output_tokens=spec.latency_output_tokens),
                rows=rows, cache_rows=cache_rows, latency_rows=latency_rows)


def step_latency_rows(model_dir: Path, text_ids: list[int], spec: ReadMEBenchSpec) -> list[dict]:
    """Decode step latency and cache hit rate for every resident set size and policy, per concurrency."""
    middle = spec.latency_capacities[len(spec.latency_capacities) // 2]
    # (C, policy, prefetch, expert-aware batching): every expert resident; each C and policy as the engine runs
    # them; then at the middle C with the prefetch thread forced on, and with expert batching (half the streams)
    settings = [(None, None, False, False)] + [(c, p, False, False) for c in spec.latency_capacities
                                               for p in ("lru", "belady")]
    settings += [(middle, "belady", True, False), (middle, "belady", False, True)]
    rows = []
    for concurrency in spec.concurrencies:
        n = spec.latency_prompt_tokens
        prompts = [text_ids[i * n:(i + 1) * n] for i in range(concurrency)]
        runs = [s for s in settings if not (s[3] and concurrency == 1)]  # one stream: no batch to choose
        results: dict[tuple, list[dict]] = {s: [] for s in runs}
        # Each setting `latency_repeats` times, round robin, so that a slow minute of the host hits them all.
        for setting in tqdm(runs * spec.latency_repeats, desc=f"bench readme step latency, concurrency {concurrency}"):
            capacity, policy, prefetch, batching = setting
            args = {} if capacity is None else dict(expert_cache_size=capacity, expert_cache_policy=policy)
            if batching:
                args["expert_batch_size"] = concurrency // 2
            with LLM(str(model_dir), dtype=spec.dtype, max_num_seqs=concurrency, **args) as llm:
                with ThreadPoolExecutor(1) as prefetcher:
                    for expert_cache in _expert_caches(llm):  # on or off, whatever the host's cores
                        expert_cache.prefetcher = prefetcher if prefetch else None
                    results[setting].append(_decode_steps(llm, prompts, spec.latency_output_tokens))
        for (capacity, policy, prefetch, batching), repeats in results.items():
            rows.append(dict(concurrency=concurrency, capacity=capacity, policy=policy, prefetch=prefetch,
                             expert_batch_size=concurrency // 2 if batching else None,
                             step_median_ms=statistics.median(r["step_median_ms"] for r in repeats),
                             decode_tok_per_s=statistics.median(r["decode_tok_per_s"] for r in repeats),
                             repeats=repeats, **{k: repeats[0][k] for k in ("decode_steps", "hit_rate")},
                             load_s=statistics.median(r["load_s"] for r in repeats)))
    return rows


def _expert_caches(llm: LLM) -> list:
    return [layer.mlp.experts.cache for layer in llm.engine.core.executor.runner.model.layers
            if layer.top_k and layer.mlp.experts.cache is not None]


def _decode_steps(llm: LLM, prompts: list[list[int]], output_tokens: int) -> dict:
    """Runs the prompts to the end; the median decode-only step time, and the expert caches' counts over those
    steps (all layers)."""
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=output_tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    caches = _expert_caches(llm)
    scheduler = engine.core.scheduler
    schedule, scheduled = scheduler.schedule, []

    def counting_schedule():  # how many decodes each step ran (expert batching holds some back)
        out = schedule()
        scheduled.append(len(out.scheduled))
        return out
    scheduler.schedule = counting_schedule
    seconds, tokens, before = [], 0, None
    while engine.has_unfinished():
        decoding = not scheduler.waiting and all(r.num_computed_tokens >= r.num_prompt_tokens
                                                 for r in scheduler.running)
        if decoding and before is None:  # the caches' counts from the first decode-only step on
            before = [(c.stats.hits, c.stats.misses, c.load_seconds) for c in caches]
        start = time.perf_counter()
        engine.step()
        if decoding:
            seconds.append(time.perf_counter() - start)
            tokens += scheduled[-1]
    hits = sum(c.stats.hits - b[0] for c, b in zip(caches, before or []))
    misses = sum(c.stats.misses - b[1] for c, b in zip(caches, before or []))
    return dict(decode_steps=len(seconds), step_median_ms=1000 * statistics.median(seconds),
                decode_tok_per_s=tokens / sum(seconds),
                hit_rate=hits / (hits + misses) if hits + misses else None,
                load_s=sum(c.load_seconds - b[2] for c, b in zip(caches, before or [])))


def router_choices(model_dir: Path, token_ids: list[int]) -> list[int]:
    """The saved pre-gating router's top-1 expert for each token."""
    router = load_pre_gating_router(model_dir, top_k=1)
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
    if result.get("latency_rows"):
        lines += ["", f"decode step latency, trained router top-1, {spec.get('latency_prompt_tokens')}-token prompts "
                      f"of held-out text, {spec.get('latency_output_tokens')} tokens each (median of decode-only "
                      f"steps; hit rate and milliseconds loading experts over all of them)",
                  f"{'concurrency':>11} {'C':>4} {'policy':>7} {'prefetch':>8} {'batching':>8} {'step ms':>8} "
                  f"{'tok/s':>7} {'hit rate':>8} {'load ms':>8}"]
        for r in result["latency_rows"]:
            capacity = "all" if r["capacity"] is None else r["capacity"]
            rate = "-" if r["hit_rate"] is None else f"{r['hit_rate']:.3f}"
            prefetch = "-" if r["capacity"] is None else ("yes" if r["prefetch"] else "no")
            batching = "-" if r["expert_batch_size"] is None else f"{r['expert_batch_size']}/step"
            lines.append(f"{r['concurrency']:>11} {capacity:>4} {r['policy'] or '-':>7} {prefetch:>8} {batching:>8} "
                         f"{r['step_median_ms']:>8.1f} {r['decode_tok_per_s']:>7.1f} {rate:>8} "
                         f"{1000 * r['load_s']:>8.1f}")
    return "\n".join(lines)
