"""Many clients at once: 128 concurrent streams finish with the right token counts and /metrics agrees; clients
that hang up (mid-stream, or while waiting for a non-streaming answer) abort their requests and free their KV
blocks. "Blocks freed" is read from /metrics: `afdserve:kv_cache_usage_perc` is 0 only when every block is free."""
from __future__ import annotations

import asyncio

import httpx
from openai import AsyncOpenAI

from .server_process import MODEL_NAME, metric, wait_for

NUM_CLIENTS = 128
NUM_TOKENS = 16
NUM_HANGUPS = 32


def pool_is_idle(server) -> bool:
    samples = server.metrics()
    return (metric(samples, "afdserve:kv_cache_usage_perc") == 0
            and metric(samples, "afdserve:num_requests_running") == 0
            and metric(samples, "afdserve:num_requests_waiting") == 0)


async def _stream_one(client: AsyncOpenAI, i: int) -> tuple[int, int, str | None]:
    """One streaming client: (tokens seen in the chunks, usage.completion_tokens, finish_reason)."""
    common = dict(model=MODEL_NAME, max_tokens=NUM_TOKENS, temperature=1.0, seed=i, stream=True,
                  stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    tokens, usage, finish = 0, -1, None
    if i % 2:  # completions count tokens through logprobs=0 (one entry per token)
        stream = await client.completions.create(prompt=f"Request {i}: once upon a time", logprobs=0, **common)
        async for chunk in stream:
            for choice in chunk.choices:
                tokens += len(choice.logprobs.tokens)
                finish = choice.finish_reason or finish
            usage = chunk.usage.completion_tokens if chunk.usage else usage
    else:  # chat counts them through logprobs=True
        stream = await client.chat.completions.create(
            messages=[{"role": "user", "content": f"Request {i}: tell me a story."}], logprobs=True, **common)
        async for chunk in stream:
            for choice in chunk.choices:
                tokens += len(choice.logprobs.content) if choice.logprobs else 0
                finish = choice.finish_reason or finish
            usage = chunk.usage.completion_tokens if chunk.usage else usage
    return tokens, usage, finish


def test_128_concurrent_streams_finish_and_metrics_agree(api_server):
    before = api_server.metrics()

    async def run_all():
        async with AsyncOpenAI(base_url=api_server.url("/v1"), api_key="unused", max_retries=0,
                               timeout=300) as client:
            return await asyncio.gather(*(_stream_one(client, i) for i in range(NUM_CLIENTS)))

    results = asyncio.run(run_all())
    assert results == [(NUM_TOKENS, NUM_TOKENS, "length")] * NUM_CLIENTS
    after = api_server.metrics()

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("afdserve:request_success_total", finished_reason="length") == NUM_CLIENTS
    assert delta("afdserve:request_aborts_total") == 0
    assert delta("afdserve:generation_tokens_total") == NUM_CLIENTS * NUM_TOKENS
    assert delta("afdserve:e2e_request_latency_seconds_count") == NUM_CLIENTS
    assert delta("afdserve:time_to_first_token_seconds_count") == NUM_CLIENTS
    assert delta("afdserve:inter_token_latency_seconds_count") == NUM_CLIENTS * (NUM_TOKENS - 1)
    assert delta("afdserve:request_time_per_output_token_seconds_count") == NUM_CLIENTS
    assert wait_for(lambda: pool_is_idle(api_server), timeout=10), "the KV pool should be free again"


async def _hang_up_mid_stream(http: httpx.AsyncClient, base_url: str, i: int) -> int:
    """Reads two content chunks of a long stream, then closes the connection; returns the chunks read."""
    body = {"model": MODEL_NAME, "prompt": f"Client {i} writes a long essay:", "max_tokens": 1000,
            "ignore_eos": True, "stream": True}
    seen = 0
    async with http.stream("POST", base_url + "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if line.startswith("data: {"):
                seen += 1
                if seen == 2:
                    break
    return seen  # leaving the block closes the unfinished response's connection


def test_clients_that_hang_up_mid_stream_abort_and_free_their_blocks(api_server):
    before = api_server.metrics()

    async def run_all():
        # one connection per client, so that closing one is a real hang-up the server sees
        limits = httpx.Limits(max_connections=NUM_HANGUPS, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=120, limits=limits) as http:
            return await asyncio.gather(*(_hang_up_mid_stream(http, api_server.base_url, i)
                                          for i in range(NUM_HANGUPS)))

    assert asyncio.run(run_all()) == [2] * NUM_HANGUPS

    def aborted() -> float:
        return metric(api_server.metrics(), "afdserve:request_aborts_total") - metric(
            before, "afdserve:request_aborts_total")

    assert wait_for(lambda: aborted() == NUM_HANGUPS, timeout=30), f"{aborted()} aborts counted"
    assert wait_for(lambda: pool_is_idle(api_server), timeout=10), "aborted requests should free their blocks"
    after = api_server.metrics()
    assert (metric(after, "afdserve:request_success_total", finished_reason="abort")
            - metric(before, "afdserve:request_success_total", finished_reason="abort")) == NUM_HANGUPS
    assert metric(after, "afdserve:request_success_total", finished_reason="length") == metric(
        before, "afdserve:request_success_total", finished_reason="length")


def test_non_streaming_client_that_gives_up_aborts_its_request(api_server):
    before = metric(api_server.metrics(), "afdserve:request_aborts_total")
    body = {"model": MODEL_NAME, "prompt": "A very long answer:", "max_tokens": 1000, "ignore_eos": True}
    try:
        httpx.post(api_server.url("/v1/completions"), json=body, timeout=1.5)
        raise AssertionError("1000 tokens should take longer than the client waits")
    except httpx.ReadTimeout:
        pass
    assert wait_for(lambda: metric(api_server.metrics(), "afdserve:request_aborts_total") == before + 1, timeout=15)
    assert wait_for(lambda: pool_is_idle(api_server), timeout=10)
