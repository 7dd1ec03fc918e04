"""Online load generator for any OpenAI-compatible server, in the manner of `vllm bench serve`.

Random token-id prompts go to POST /v1/completions with `stream=true` and `stream_options.include_usage`; arrivals
are Poisson (`--request-rate R`, gamma-shaped with `--burstiness`) or all at once (`inf`), capped by
`--max-concurrency`. Per request it records TTFT, the gaps between streamed chunks (ITL), end-to-end latency and
the server-reported output tokens; TPOT = (E2EL - TTFT) / (output tokens - 1).

Workloads: every request `input_len` in / `output_len` out (`length_dist` fixed), or lengths drawn per request around
them (uniform on [len/2, 3len/2]; lognormal with that median and sigma 0.5, clipped to [1, 4 len]); with
`shared_prefix_len` every prompt starts with the same tokens (a system prompt: prefix caching's case). With `turns` >
1 the requests form chat conversations of that many turns, sent one after another (the next when the previous
answer ends): turn k's prompt is the whole conversation so far, then `input_len` new tokens, so each turn re-sends
a growing prefix (prefix caching's other case). The API streams text, not token ids, so the earlier answers in that
history are stood in for by random ids of the answer's length; the concurrency and the arrivals then count
conversations.
"""
from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class ServeSpec:
    base_url: str = "http://127.0.0.1:8000"
    model: str = "smollm2"
    num_requests: int = 128
    input_len: int = 128
    output_len: int = 128
    max_concurrency: int = 32
    request_rate: float = float("inf")  # requests per second; inf sends all at once
    burstiness: float = 1.0  # 1.0: Poisson; < 1 burstier, > 1 more regular (gamma-distributed gaps)
    vocab_size: int = 49152
    seed: int = 0
    length_dist: str = "fixed"  # fixed, uniform or lognormal (LENGTH_DISTS)
    shared_prefix_len: int = 0  # tokens every prompt starts with, before its own input_len
    turns: int = 1  # requests per conversation; num_requests counts requests, a multiple of turns

    def __post_init__(self) -> None:
        if self.length_dist not in LENGTH_DISTS:
            raise ValueError(f"length_dist must be one of {', '.join(LENGTH_DISTS)}, got {self.length_dist!r}")
        if self.turns < 1 or self.num_requests % self.turns:
            raise ValueError(f"turns must be >= 1 and divide the number of requests ({self.num_requests}), "
                             f"got {self.turns}")

    @property
    def num_conversations(self) -> int:
        return self.num_requests // self.turns


LENGTH_DISTS = ("fixed", "uniform", "lognormal")


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    e2el: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str = ""


def lengths(dist: str, mean: int, n: int, rng: np.random.Generator) -> list[int]:
    """n lengths around `mean`: all equal (fixed), uniform on [mean/2, 3 mean/2], or lognormal with median `mean`."""
    if dist == "fixed":
        return [mean] * n
    if dist == "uniform":
        return rng.integers(max(1, mean // 2), mean + mean // 2 + 1, n).tolist()
    return np.clip(np.round(rng.lognormal(np.log(mean), 0.5, n)), 1, 4 * mean).astype(int).tolist()


def conversations(spec: ServeSpec) -> list[list[tuple[list[int], int]]]:
    """Per conversation, its turns as (prompt token ids, max_tokens). Ids well inside the vocabulary, above its
    special tokens. With one turn each, a conversation is one independent request."""
    rng = np.random.default_rng(spec.seed)
    ids = lambda n: rng.integers(100, spec.vocab_size - 100, n).tolist()
    prefix = ids(spec.shared_prefix_len)
    ins = lengths(spec.length_dist, spec.input_len, spec.num_requests, rng)
    outs = lengths(spec.length_dist, spec.output_len, spec.num_requests, rng)
    chats = []
    for c in range(spec.num_conversations):
        history, turns = list(prefix), []
        for n_in, n_out in zip(ins[c * spec.turns:(c + 1) * spec.turns], outs[c * spec.turns:(c + 1) * spec.turns]):
            if turns:
                history += ids(turns[-1][1])  # the previous answer's stand-in (see the module doc)
            history += ids(n_in)
            turns.append((list(history), n_out))
        chats.append(turns)
    return chats


def requests(spec: ServeSpec) -> list[tuple[list[int], int]]:
    """Every request of `conversations`, in conversation order."""
    return [turn for chat in conversations(spec) for turn in chat]


def _gaps(spec: ServeSpec) -> list[float]:
    """Seconds before each conversation starts."""
    if spec.request_rate == float("inf"):
        return [0.0] * spec.num_conversations
    rng = np.random.default_rng(spec.seed + 1)
    theta = 1.0 / (spec.request_rate * spec.burstiness)
    return rng.gamma(spec.burstiness, theta, spec.num_conversations).tolist()


async def _one(client, spec: ServeSpec, prompt: list[int], max_tokens: int) -> RequestResult:
    body = {"model": spec.model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    last = None
    result = RequestResult(ok=False)
    try:
        async with client.stream("POST", f"{spec.base_url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    now = time.perf_counter()
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
        result.e2el = time.perf_counter() - start
        result.ok = result.output_tokens > 0
        if not result.ok:
            result.error = "no usage in the stream"
    except Exception as e:  # a failed request is counted, not fatal to the run
        result.error = repr(e)
    return result


def request_tpot(r: RequestResult) -> float | None:
    """vLLM's TPOT of one request: (E2EL - TTFT) / (output tokens - 1); None with fewer than two tokens."""
    return (r.e2el - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else None


async def run_requests(spec: ServeSpec) -> tuple[list[RequestResult], float]:
    """Sends the spec's prompts as it says; returns each request's result, in conversation order, and the run's
    duration in seconds."""
    import httpx

    chats, gaps = conversations(spec), _gaps(spec)
    limit = asyncio.Semaphore(spec.max_concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(
            max_connections=spec.max_concurrency, max_keepalive_connections=spec.max_concurrency)) as client:
        async def converse(turns):
            async with limit:
                return [await _one(client, spec, prompt, max_tokens) for prompt, max_tokens in turns]

        start = time.perf_counter()
        tasks = []
        for turns, gap in zip(chats, gaps):
            await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(converse(turns)))
        results = [r for chat in await asyncio.gather(*tasks) for r in chat]
        return results, time.perf_counter() - start


def _summary(values: list[float]) -> dict:
    ms = [v * 1000 for v in values]
    if not ms:
        return {"mean_ms": None, "median_ms": None, "p99_ms": None}
    return {"mean_ms": statistics.fmean(ms), "median_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99))}


def run_serve_bench(spec: ServeSpec) -> dict:
    results, duration = asyncio.run(run_requests(spec))
    done = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in done)
    tpot = [t for t in map(request_tpot, done) if t is not None]
    return {
        "spec": asdict(spec), "completed": len(done), "failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if not r.ok})[:5], "duration_s": duration,
        "output_tokens": out_tokens, "output_tok_per_s": out_tokens / duration,
        "requests_per_s": len(done) / duration,
        "ttft": _summary([r.ttft for r in done]), "tpot": _summary(tpot),
        "itl": _summary([g for r in done for g in r.itl]), "e2el": _summary([r.e2el for r in done]),
    }


def format_serve_result(r: dict) -> str:
    s = r["spec"]
    line = lambda name: (f"{name.upper()} ms: mean {r[name]['mean_ms']:.1f} median {r[name]['median_ms']:.1f} "
                         f"p99 {r[name]['p99_ms']:.1f}") if r[name]["mean_ms"] is not None else f"{name}: n/a"
    return "\n".join([
        f"{s['base_url']} model={s['model']} requests={s['num_requests']} in={s['input_len']} out={s['output_len']} "
        f"({s['length_dist']}, shared prefix {s['shared_prefix_len']}, turns {s['turns']}) "
        f"max_concurrency={s['max_concurrency']} rate={s['request_rate']} burstiness={s['burstiness']}",
        f"completed {r['completed']}, failed {r['failed']}, {r['duration_s']:.1f} s, "
        f"output {r['output_tok_per_s']:.1f} tok/s, {r['requests_per_s']:.2f} req/s",
        line("ttft"), line("tpot"), line("itl"), line("e2el"),
    ] + [f"error: {e}" for e in r["errors"]])
