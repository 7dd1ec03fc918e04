"""Prometheus metrics for /metrics, named like vLLM's (`vllm:` -> `afdserve:`), on the server's own registry.

Three sources:
  - per-request outcomes and latencies, recorded by the server when a request finishes or is aborted
    (from the engine's timestamps in RequestOutput.metrics: arrival, first token, every token);
  - the engine's scheduler / KV state (running, waiting, KV usage, prefix cache, preemptions) and the work it did
    (`compute_flops_total{kind}`, `kv_read_bytes_total`, `compute_eflops_total`: the sums of what requests' `usage`
    reports as `afdserve_cost`, aborted and recomputed chunks included), read from `AsyncEngine.stats()` at scrape
    time by a collector, so nothing has to push it;
  - with AFD, the per-layer attention / FFN / transfer times and each side's bubble (`afd_*`, worker 0's), every
    worker's compute and bubble (`afd_worker_*{role, rank}`) and the tokens routed to each expert
    (`afd_expert_tokens_total{layer, expert}`), from the executor's snapshot (`AsyncEngine.stage_times()`,
    refreshed about once a second; cumulative since start).

Counting units: `request_success_total{finished_reason}` and the latency histograms count sequences (a request
with n=2 counts 2, as vLLM's fanned-out child requests do); `request_aborts_total` counts requests. An aborted
request also adds its unfinished sequences to `request_success_total{finished_reason="abort"}` (vLLM's label set).
`kv_cache_usage_perc` is the fraction of KV blocks held by requests (0..1); it returns to 0 once every request has
finished or been aborted, which is how tests check that no blocks leak.
"""
from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from afdserve.engine.outputs import RequestOutput
from afdserve.engine.scheduler import SchedulerStats
from afdserve.engine.sla_control import SLAStats

# vLLM's buckets (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0]
TOKEN_LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                         20.0, 40.0, 80.0]
E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0]
PREFIX = "afdserve:"


class ServerMetrics:
    def __init__(self, model_name: str, engine_stats: Callable[[], SchedulerStats],
                 stage_times: Callable[[], dict | None] = lambda: None):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        labels = ["model_name"]

        def counter(name, doc, extra=()):
            return Counter(PREFIX + name, doc, labels + list(extra), registry=self.registry)

        def histogram(name, doc, buckets):
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=self.registry)

        self.request_success = counter("request_success", "Finished sequences, by finish reason.",
                                       ["finished_reason"])
        self.request_aborts = counter("request_aborts", "Requests aborted before finishing (client gone, drain).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished or aborted requests.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens of finished or aborted requests.")
        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first token.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Gap between consecutive tokens of a sequence.",
                             TOKEN_LATENCY_BUCKETS)
        self.tpot = histogram("request_time_per_output_token_seconds",
                              "Per sequence: (last token - first token) / (output tokens - 1).",
                              TOKEN_LATENCY_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish.", E2E_BUCKETS)
        # Create every series now, so that scrapers see zeros instead of missing series before the first request.
        for metric in (self.request_aborts, self.prompt_tokens, self.generation_tokens, self.ttft, self.itl,
                       self.tpot, self.e2e):
            metric.labels(model_name)
        for reason in ("stop", "length", "abort"):
            self.request_success.labels(model_name, reason)
        self.registry.register(_EngineStatsCollector(model_name, engine_stats, stage_times))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def record_finished(self, output: RequestOutput) -> None:
        now = time.monotonic()
        name = self.model_name
        self._record_tokens(output)
        for completion in output.outputs:
            self.request_success.labels(name, completion.finish_reason or "abort").inc()
        arrival, first = output.metrics.get("arrival_time"), output.metrics.get("first_token_time")
        if arrival is None:
            return
        self.e2e.labels(name).observe(now - arrival)
        if first is not None:
            self.ttft.labels(name).observe(first - arrival)
        for times in output.metrics.get("token_times", []):
            for earlier, later in zip(times, times[1:]):
                self.itl.labels(name).observe(later - earlier)
            if len(times) > 1:
                self.tpot.labels(name).observe((times[-1] - times[0]) / (len(times) - 1))

    def record_aborted(self, last_output: RequestOutput | None, num_prompt_tokens: int) -> None:
        """A request that ended before finishing; `last_output` is the last one the server saw (None: none yet)."""
        name = self.model_name
        self.request_aborts.labels(name).inc()
        if last_output is None:
            self.prompt_tokens.labels(name).inc(num_prompt_tokens)
            return
        self._record_tokens(last_output)
        unfinished = sum(1 for c in last_output.outputs if c.finish_reason is None)
        if unfinished:
            self.request_success.labels(name, "abort").inc(unfinished)

    def _record_tokens(self, output: RequestOutput) -> None:
        self.prompt_tokens.labels(self.model_name).inc(len(output.prompt_token_ids))
        self.generation_tokens.labels(self.model_name).inc(sum(len(c.token_ids) for c in output.outputs))


class _EngineStatsCollector:
    """Reads the scheduler's counters at scrape time (a few ints read across threads: a snapshot, not a lock)."""

    def __init__(self, model_name: str, engine_stats: Callable[[], SchedulerStats],
                 stage_times: Callable[[], dict | None]):
        self.model_name = model_name
        self.engine_stats = engine_stats
        self.stage_times = stage_times

    def describe(self):
        return []  # unknown until scraped; keeps the registry from calling collect() at registration

    def collect(self):
        stats = self.engine_stats()
        labels = [self.model_name]

        def family(kind, name, doc, value):
            metric = kind(PREFIX + name, doc, labels=["model_name"])
            metric.add_metric(labels, value)
            return metric

        yield family(GaugeMetricFamily, "num_requests_running", "Sequences in the running batch.",
                     stats.num_running)
        yield family(GaugeMetricFamily, "num_requests_waiting", "Sequences waiting to be scheduled.",
                     stats.num_waiting)
        yield family(GaugeMetricFamily, "kv_cache_usage_perc", "Fraction of KV blocks in use (1 = full).",
                     stats.kv_usage)
        yield family(CounterMetricFamily, "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                     stats.prefix_queries)
        yield family(CounterMetricFamily, "prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                     stats.prefix_hits)
        yield family(CounterMetricFamily, "num_preemptions", "Preemptions (recompute) so far.",
                     stats.num_preemptions)
        if stats.cost is not None:
            flops = CounterMetricFamily(PREFIX + "compute_flops", "FLOPs of every chunk computed since start, by "
                                        "kind (linear: weight matmuls; attention: QK and PV).",
                                        labels=["model_name", "kind"])
            flops.add_metric([self.model_name, "linear"], stats.cost.linear_flops)
            flops.add_metric([self.model_name, "attention"], stats.cost.attention_flops)
            yield flops
            yield family(CounterMetricFamily, "kv_read_bytes", "KV cache bytes read by attention since start.",
                         stats.cost.kv_bytes_read)
            yield family(CounterMetricFamily, "compute_eflops", "eFLOPs since start: FLOPs + 562.5 x KV bytes read "
                         "(Kinetics' B200 intensity).", stats.cost.eflops)
        if stats.sla is not None:
            yield from self._sla_families(stats.sla, family)
        if stats.expert_cache is not None:
            cache = stats.expert_cache
            yield family(CounterMetricFamily, "expert_cache_hits", "MoE expert loads avoided: the expert was "
                         "resident (--expert-cache-size; summed over layers).", cache.hits)
            yield family(CounterMetricFamily, "expert_cache_misses", "MoE experts loaded from their memory-mapped "
                         "files into a resident slot (summed over layers).", cache.misses)
            yield family(CounterMetricFamily, "expert_cache_load_seconds", "Time spent copying experts into "
                         "resident slots (summed over layers).", cache.load_seconds)
        afd = self.stage_times()
        if afd is not None:
            for key, doc in (("attention", "AFD: attention-side compute per layer and step"),
                             ("ffn", "AFD: FFN-side compute per layer and step"),
                             ("transfer", "AFD: time in send calls (both sides) per layer and step")):
                yield family(GaugeMetricFamily, f"afd_{key}_seconds_per_layer", doc + ", mean since start.",
                             afd[f"{key}_ms_per_layer"] / 1000)
            for name, doc, unit in (("afd_moe_layer_passes", "AFD: sharded MoE layer passes by how they ran "
                                     "(expert-parallel or expert-sliced, chosen per pass from the routed load).",
                                     "passes"),
                                    ("afd_moe_layer_pass_seconds", "AFD: FFN worker 0's time in sharded MoE layer "
                                     "passes by mode (an expert-parallel pass includes gathering its experts).",
                                     "s")):
                by_mode = CounterMetricFamily(PREFIX + name, doc, labels=["model_name", "mode"])
                by_mode.add_metric([self.model_name, "expert_parallel"], afd[f"moe_ep_{unit}"])
                by_mode.add_metric([self.model_name, "expert_sliced"], afd[f"moe_sliced_{unit}"])
                yield by_mode
            yield family(CounterMetricFamily, "afd_moe_gathered_weight_bytes", "AFD: expert weight bytes FFN worker 0 "
                         "received from its peers for expert-parallel passes.", afd["moe_gathered_bytes"])
            for side in ("attention", "ffn"):
                yield family(GaugeMetricFamily, f"afd_{side}_bubble_ratio",
                             f"AFD: fraction of the {side} workers' busy time spent waiting for the other side.",
                             afd[f"{side}_bubble"])
            yield from self._afd_worker_families(afd)

    def _afd_worker_families(self, afd: dict):
        """Every AFD worker's compute and bubble (the families above are worker 0's), and the tokens routed to
        each expert of each MoE layer."""
        labels = ["model_name", "role", "rank"]
        compute = GaugeMetricFamily(PREFIX + "afd_worker_compute_seconds_per_layer",
                                    "AFD: each worker's compute per layer and step, mean since start.", labels=labels)
        bubble = GaugeMetricFamily(PREFIX + "afd_worker_bubble_ratio",
                                   "AFD: fraction of each worker's busy time spent waiting.", labels=labels)
        for w in afd.get("per_worker", []):
            compute.add_metric([self.model_name, w["role"], str(w["rank"])], w["compute_ms_per_layer"] / 1000)
            bubble.add_metric([self.model_name, w["role"], str(w["rank"])], w["bubble"])
        experts = CounterMetricFamily(PREFIX + "afd_expert_tokens", "AFD: token rows routed to each expert of each "
                                      "MoE layer (top-k counts each pick).", labels=["model_name", "layer", "expert"])
        for layer, counts in afd.get("expert_tokens", {}).items():
            for expert, count in enumerate(counts):
                experts.add_metric([self.model_name, layer, str(expert)], count)
        yield from (compute, bubble, experts)

    def _sla_families(self, sla: SLAStats, family):
        """--tpot-slo-ms: the step-time model the scheduler's caps come from, and how often it held requests."""
        yield family(GaugeMetricFamily, "sla_step_time_target_seconds",
                     "TPOT SLO control: the step time aimed at (the SLO less headroom).", sla.target_s)
        model = GaugeMetricFamily(PREFIX + "sla_step_time_model_seconds",
                                  "TPOT SLO control: fitted step time = base + per_decode * decode rows + "
                                  "per_prefill_token * prompt tokens (0 until fitted).",
                                  labels=["model_name", "term"])
        for term, value in (("base", sla.base_s), ("per_decode", sla.per_decode_s),
                            ("per_prefill_token", sla.per_prefill_token_s)):
            model.add_metric([self.model_name, term], value)
        yield model
        if sla.max_seqs is not None:
            yield family(GaugeMetricFamily, "sla_max_num_seqs",
                         "TPOT SLO control: the most running sequences whose step fits the target.", sla.max_seqs)
        yield family(CounterMetricFamily, "sla_held_steps",
                     "TPOT SLO control: steps in which waiting requests stayed waiting for room under the SLO.",
                     sla.held_steps)
