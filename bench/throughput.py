"""Offline throughput: N synthetic requests (random token ids, fixed lengths, EOS ignored) through the engine with
at most `concurrency` in flight; reports output tok/s and TTFT / TPOT statistics."""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
from tqdm import tqdm

from afdserve.bench.host import format_host, host_info
from afdserve.engine.config import EngineConfig
from afdserve.engine.llm_engine import LLMEngine
from afdserve.engine.sampling_params import SamplingParams
from afdserve.models.hf_config import resolve_dtype
from afdserve.models.loader import full_model_weight_bytes


@dataclass
class ThroughputSpec:
    num_requests: int = 128
    input_len: int = 128
    output_len: int = 128
    concurrency: int = 32
    seed: int = 0


def synthetic_prompts(spec: ThroughputSpec, vocab_size: int, special_ids: set[int]) -> list[list[int]]:
    rng = np.random.default_rng(spec.seed)
    prompts = []
    for _ in range(spec.num_requests):
        ids = rng.integers(0, vocab_size, spec.input_len).tolist()
        prompts.append([t if t not in special_ids else t + 1 for t in ids])
    return prompts


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _stats(values: list[float]) -> dict:
    ms = [v * 1000 for v in values]
    return {"mean_ms": statistics.fmean(ms) if ms else float("nan"), "median_ms": _percentile(ms, 50),
            "p99_ms": _percentile(ms, 99)}


def run_throughput(config: EngineConfig, spec: ThroughputSpec) -> dict:
    engine = LLMEngine(config)
    prompts = synthetic_prompts(spec, engine.model_config.vocab_size, engine.tokenizer.special_ids)
    params = SamplingParams(temperature=0, max_tokens=spec.output_len, ignore_eos=True)
    # Warm-up at the run's own concurrency and prompt length, on other prompts (no prefix-cache hits for the timed
    # ones): the kernels a full batch needs are compiled and allocated before the clock starts. One short request
    # left a GPU's Triton compiles in the first timed run (2x on an H200; bench/results/README.md).
    warmup = replace(spec, num_requests=min(spec.concurrency, spec.num_requests), seed=spec.seed + 1)
    for i, prompt in enumerate(synthetic_prompts(warmup, engine.model_config.vocab_size,
                                                 engine.tokenizer.special_ids)):
        engine.add_request(f"warmup-{i}", prompt, SamplingParams(max_tokens=4, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()

    submit: dict[str, float] = {}
    ttft, tpot, out_tokens = [], [], 0
    pending = list(enumerate(prompts))
    start = time.perf_counter()
    with tqdm(total=spec.num_requests, desc="bench throughput") as bar:
        while pending or engine.has_unfinished():
            while pending and len(submit) < spec.concurrency:
                i, prompt = pending.pop(0)
                engine.add_request(str(i), prompt, params)
                submit[str(i)] = time.perf_counter()
            for out in engine.step():
                if not out.finished:
                    continue
                times = out.metrics["token_times"][0]
                n = len(out.outputs[0].token_ids)
                ttft.append(out.metrics["first_token_time"] - out.metrics["arrival_time"])
                if n > 1:
                    tpot.append((times[-1] - times[0]) / (n - 1))
                out_tokens += n
                del submit[out.request_id]
                bar.update(1)
    elapsed = time.perf_counter() - start
    stats = engine.core.stats()
    afd_times = engine.core.executor.stage_times() if config.parallel.enabled else None
    step_bytes = list(engine.core.executor.decode_step_input_bytes) if config.parallel.enabled else []
    worker_bytes = engine.core.executor.worker_weight_bytes() if config.parallel.enabled else None
    dtype = resolve_dtype(config.model.dtype, engine.model_config, config.model.device)
    model_bytes = full_model_weight_bytes(engine.model_config, dtype, engine.max_model_len)
    engine.shutdown()
    return {
        "host": host_info(config.model.device),
        "model": config.model.model, "dtype": config.model.dtype,
        "run_dtype": str(dtype).removeprefix("torch."), "device": config.model.device, "spec": asdict(spec),
        "elapsed_s": elapsed, "output_tokens": out_tokens, "output_tok_per_s": out_tokens / elapsed,
        "requests_per_s": spec.num_requests / elapsed, "ttft": _stats(ttft), "tpot": _stats(tpot),
        "num_preemptions": stats.num_preemptions, "engine_steps": engine.core.num_steps,
        "afd": config.parallel.afd, "micro_batches": config.parallel.micro_batches, "afd_stage_times": afd_times,
        # Median bytes of the step messages to the attention workers over pure decode steps (pickled, as sent).
        "afd_step_input_bytes": float(np.median(step_bytes)) if step_bytes else None,
        "model_weight_bytes": model_bytes, "worker_weight_bytes": worker_bytes,
    }


def format_result(r: dict) -> str:
    s = r["spec"]
    return "\n".join([
        format_host(r["host"]),
        f"model={r['model']} dtype={r['dtype']} device={r['device']} requests={s['num_requests']} in={s['input_len']} "
        f"out={s['output_len']} concurrency={s['concurrency']}",
        f"elapsed {r['elapsed_s']:.1f} s, output {r['output_tok_per_s']:.1f} tok/s, "
        f"{r['requests_per_s']:.2f} req/s, preemptions {r['num_preemptions']}",
        f"TTFT ms: mean {r['ttft']['mean_ms']:.1f} median {r['ttft']['median_ms']:.1f} p99 {r['ttft']['p99_ms']:.1f}",
        f"TPOT ms: mean {r['tpot']['mean_ms']:.1f} median {r['tpot']['median_ms']:.1f} p99 {r['tpot']['p99_ms']:.1f}",
    ] + _afd_lines(r))


def _afd_lines(r: dict) -> list[str]:
    t = r.get("afd_stage_times")
    if not t:
        return []
    w, whole = r["worker_weight_bytes"], r["model_weight_bytes"]
    shares = ", ".join(f"{kind} {b / whole:.0%}" for kind in ("attention", "ffn") for b in w[kind])
    return [f"AFD step input: median {r['afd_step_input_bytes']} bytes per decode step to the attention workers",
            f"AFD weights per worker (share of the model's {whole / 2**20:.1f} MiB): {shares}",
            f"AFD {r['afd']} m={r['micro_batches']}, per layer and step (incl. warm-up): attention "
            f"{t['attention_ms_per_layer']:.2f} ms, FFN {t['ffn_ms_per_layer']:.2f} ms, transfer (in send calls) "
            f"{t['transfer_ms_per_layer']:.2f} ms; waiting (the other side + receiving) attention {t['attention_wait_ms_per_layer']:.2f} ms, FFN {t['ffn_wait_ms_per_layer']:.2f} "
            f"ms; bubble attention {t['attention_bubble']:.0%}, FFN {t['ffn_bubble']:.0%}"]
