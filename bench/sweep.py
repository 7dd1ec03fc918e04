"""`afdserve bench sweep`: how much an OpenAI-compatible server serves within a latency SLO.

Each load point is one run of bench/serve.py's client (streaming /v1/completions with token-id prompts, so any
server and no tokenizer): a fixed concurrency (all prompts sent at once, at most c in flight) or a request rate
(Poisson arrivals, no cap). Per request, vLLM's definitions: TTFT; TPOT = (E2EL - TTFT) / (output tokens - 1); ITL =
the gaps between streamed chunks; E2EL.

SLOs use vLLM's `--goodput ttft:MS tpot:MS e2el:MS` syntax. Goodput is DistServe's: the requests per second that met
every given SLO (a failed request meets none); SLO attainment is their share of all requests sent. A load point
*meets the SLO* when the `--slo-percentile` (default 90) of each given metric is within its limit and no request
failed. `--search concurrency|rate` bisects for the highest load that meets it, assuming latency grows with load.
"""
from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field

import numpy as np

from afdserve.bench.serve import RequestResult, ServeSpec, request_tpot, run_requests

SLO_METRICS = ("ttft", "tpot", "e2el")


def parse_goodput(items: list[str]) -> dict[str, float]:
    """["ttft:500", "tpot:100"] -> {"ttft": 500.0, "tpot": 100.0} (milliseconds), as vLLM's --goodput."""
    slo = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"--goodput takes METRIC:MS with METRIC one of {', '.join(SLO_METRICS)}, got {item!r}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: {value!r} is not a number of milliseconds") from None
        if not ms > 0:
            raise ValueError(f"--goodput {item!r}: the limit must be a positive number of milliseconds")
        slo[name] = ms
    return slo


@dataclass(frozen=True)
class SweepSpec:
    # The requests of every load point (server, model, prompts, lengths); its concurrency and rate are set per point.
    workload: ServeSpec = field(default_factory=lambda: ServeSpec(num_requests=64))
    concurrency: tuple[int, ...] = ()  # a grid of concurrencies ...
    request_rate: tuple[float, ...] = ()  # ... or of request rates (requests per second)
    search: str | None = None  # or "concurrency" / "rate": bisect up to search_max
    search_max: float = 64
    slo: dict[str, float] = field(default_factory=dict)  # metric -> milliseconds
    slo_percentile: float = 90.0

    def __post_init__(self) -> None:
        if sum(map(bool, (self.concurrency, self.request_rate, self.search))) != 1:
            raise ValueError("give one of --concurrency, --request-rate or --search")
        if self.search not in (None, "concurrency", "rate"):
            raise ValueError(f"--search must be concurrency or rate, got {self.search!r}")
        if self.search and not self.slo:
            raise ValueError("--search needs an SLO to search against: --goodput tpot:MS (and ttft, e2el)")
        if not 0 < self.slo_percentile <= 100:
            raise ValueError(f"--slo-percentile must be in (0, 100], got {self.slo_percentile}")


def request_latencies_ms(r: RequestResult) -> dict[str, float | None]:
    tpot = request_tpot(r)
    return {"ttft": r.ttft * 1e3, "tpot": None if tpot is None else tpot * 1e3, "e2el": r.e2el * 1e3}


def meets_every_slo(r: RequestResult, slo: dict[str, float]) -> bool:
    """DistServe's good request. A one-token output counts TPOT 0, as vLLM's goodput does."""
    if not r.ok:
        return False
    latencies = request_latencies_ms(r)
    return all((latencies[name] or 0.0) <= limit for name, limit in slo.items())


def distribution(values_ms: list[float], percentile: float) -> dict:
    keys = {"p50": 50.0, "p90": 90.0, "p99": 99.0, f"p{percentile:g}": percentile}
    if not values_ms:
        return {"mean": None, **{k: None for k in keys}}
    return {"mean": float(np.mean(values_ms)), **{k: float(np.percentile(values_ms, p)) for k, p in keys.items()}}


def summarize_point(results: list[RequestResult], duration_s: float, slo: dict[str, float],
                    percentile: float) -> dict:
    """One load point's throughput, goodput and latency distributions (milliseconds)."""
    done = [r for r in results if r.ok]
    per_request = [request_latencies_ms(r) for r in done]
    good = sum(meets_every_slo(r, slo) for r in results)
    point = {
        "completed": len(done), "failed": len(results) - len(done),
        "output_tok_s": sum(r.output_tokens for r in done) / duration_s,
        "request_s": len(done) / duration_s,
        "goodput_req_s": good / duration_s,
        "slo_attainment": good / len(results),
        "duration_s": duration_s,
    }
    for name in SLO_METRICS:
        point[f"{name}_ms"] = distribution([lat[name] for lat in per_request if lat[name] is not None], percentile)
    point["itl_ms"] = distribution([gap * 1e3 for r in done for gap in r.itl], percentile)
    at = f"p{percentile:g}"
    point["meets_slo"] = point["failed"] == 0 and all(
        point[f"{name}_ms"][at] is not None and point[f"{name}_ms"][at] <= limit for name, limit in slo.items())
    return point


def run_point(spec: SweepSpec, concurrency: int | None = None, request_rate: float | None = None) -> dict:
    """One load: `concurrency` requests in flight at most, sent at once; or Poisson arrivals at `request_rate`."""
    serve = dataclasses.replace(spec.workload, max_concurrency=concurrency or spec.workload.num_requests,
                                request_rate=request_rate or float("inf"))
    results, duration = asyncio.run(run_requests(serve))
    load = {"concurrency": concurrency} if concurrency else {"request_rate": request_rate}
    return {**load, **summarize_point(results, duration, spec.slo, spec.slo_percentile)}


def search_loads(spec: SweepSpec, run=run_point) -> list[dict]:
    """Bisection for the highest load that meets the SLO: concurrency to the integer, rate to 5%."""
    by_concurrency = spec.search == "concurrency"

    def measure(load: float) -> dict:
        return run(spec, concurrency=int(load)) if by_concurrency else run(spec, request_rate=load)
    low = 1.0 if by_concurrency else spec.search_max / 64
    points = [measure(low)]
    if not points[-1]["meets_slo"]:
        return points  # even the lightest load misses it
    high = float(spec.search_max)
    points.append(measure(high))
    if points[-1]["meets_slo"]:
        return points
    while (high - low > 1) if by_concurrency else (high / low > 1.05):
        mid = (low + high) // 2 if by_concurrency else (low * high) ** 0.5
        points.append(measure(mid))
        low, high = (mid, high) if points[-1]["meets_slo"] else (low, mid)
    return points


def run_sweep(spec: SweepSpec, run=run_point) -> dict:
    if spec.search:
        points = search_loads(spec, run)
    elif spec.concurrency:
        points = [run(spec, concurrency=c) for c in spec.concurrency]
    else:
        points = [run(spec, request_rate=r) for r in spec.request_rate]
    load_key = "concurrency" if spec.concurrency or spec.search == "concurrency" else "request_rate"
    points.sort(key=lambda p: p[load_key])
    good = [p for p in points if p["meets_slo"]] if spec.slo else []
    return {"spec": dataclasses.asdict(spec), "load": load_key, "points": points,
            "max_under_slo": max(good, key=lambda p: p[load_key]) if good else None}


def format_sweep_result(result: dict) -> str:
    spec, key = result["spec"], result["load"]
    w = spec["workload"]
    at = f"p{spec['slo_percentile']:g}"
    slo = ", ".join(f"{name} {at} <= {ms:g} ms" for name, ms in spec["slo"].items()) or "none"
    lines = [f"{w['base_url']} model={w['model']} prompts={w['num_requests']} in={w['input_len']} "
             f"out={w['output_len']} ({w['length_dist']}, shared prefix {w['shared_prefix_len']}, turns {w['turns']}); "
             f"SLO: {slo}",
             f"{key:>12} {'tok/s':>8} {'req/s':>6} {'goodput':>8} {'attain':>7} {'TTFT ' + at:>10} "
             f"{'TPOT ' + at:>10} {'ITL ' + at:>9} {'E2EL ' + at:>10} {'failed':>6} meets"]
    ms = lambda p, name: f"{p[name + '_ms'][at]:.1f}" if p[name + "_ms"][at] is not None else "n/a"
    for p in result["points"]:
        lines.append(f"{p[key]:>12g} {p['output_tok_s']:>8.1f} {p['request_s']:>6.2f} {p['goodput_req_s']:>8.2f} "
                     f"{p['slo_attainment']:>7.2f} {ms(p, 'ttft'):>10} {ms(p, 'tpot'):>10} {ms(p, 'itl'):>9} "
                     f"{ms(p, 'e2el'):>10} {p['failed']:>6} {'yes' if p['meets_slo'] else 'no'}")
    best = result["max_under_slo"]
    lines.append(f"max {key} under the SLO: {best[key]:g} ({best['output_tok_s']:.1f} output tok/s)" if best else
                 "no load point met the SLO" if spec["slo"] else "no SLO given")
    return "\n".join(lines)
