"""`afdserve bench serve` (the OpenAI-API load generator) against the real server: Poisson arrivals, streaming,
usage; every request completes with exactly the asked-for tokens, and the server's /metrics agrees."""
from afdserve.bench.serve import ServeSpec, run_serve_bench

from .server_process import metric


def test_load_generator_with_poisson_arrivals(api_server):
    before = api_server.metrics()
    spec = ServeSpec(base_url=api_server.base_url, model="smollm2", num_requests=12, input_len=24,
                     output_len=6, max_concurrency=4, request_rate=20.0, burstiness=1.0)
    result = run_serve_bench(spec)
    assert result["completed"] == 12 and result["failed"] == 0, result["errors"]
    assert result["output_tokens"] == 12 * 6
    assert result["ttft"]["median_ms"] > 0 and result["tpot"]["median_ms"] > 0
    after = api_server.metrics()
    name = "afdserve:generation_tokens_total"
    assert metric(after, name) - metric(before, name) == 12 * 6
