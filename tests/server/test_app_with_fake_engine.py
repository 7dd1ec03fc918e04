"""The FastAPI app in process, over a scripted stand-in for AsyncEngine (no model): what a dead engine and an
engine failure in the middle of a stream look like to a client, and the names /metrics exposes."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from afdserve.engine.async_engine import EngineDeadError
from afdserve.engine.outputs import CompletionOutput, RequestOutput
from afdserve.engine.scheduler import SchedulerStats
from afdserve.engine.server.api_server import build_app


class FakeTokenizer:
    max_token_bytes = 1  # one token per character

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) % 50 for c in text]

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + t % 26) for t in token_ids)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return "|".join(m["content"] for m in messages)


class FakeEngine:
    """Yields one token, then fails as a dying engine loop does (or fails at once when not alive)."""

    def __init__(self, alive: bool = True):
        self.is_alive = alive
        self.tokenizer = FakeTokenizer()
        self.max_model_len = 64
        self.engine = SimpleNamespace(model_config=SimpleNamespace(vocab_size=50), check_params=lambda params: None)

    def stage_times(self) -> None:  # no AFD
        return None

    def stats(self) -> SchedulerStats:
        return SchedulerStats(num_running=0, num_waiting=0, kv_usage=0.0, num_preemptions=0, prefix_queries=0,
                              prefix_hits=0)

    async def generate(self, prompt, params, request_id):
        if not self.is_alive:
            raise EngineDeadError("the engine loop is not running")
        yield RequestOutput(request_id, None, list(prompt), [CompletionOutput(0, "x", [1], text_delta="x")])
        raise EngineDeadError("engine loop died: boom")


@pytest.fixture
def alive_client():
    return TestClient(build_app(FakeEngine(alive=True), "fake"))


def test_health_is_503_once_the_engine_died():
    engine = FakeEngine(alive=True)
    client = TestClient(build_app(engine, "fake"))
    assert client.get("/health").status_code == 200
    engine.is_alive = False
    resp = client.get("/health")
    assert resp.status_code == 503 and resp.json()["error"]["type"] == "ServiceUnavailableError"
    resp = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert resp.status_code == 503 and resp.json()["error"]["code"] == 503


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}),
])
def test_engine_failure_mid_stream_is_an_error_event_then_done(alive_client, path, body):
    with alive_client.stream("POST", path, json=body) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in resp.iter_lines() if line]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == 503 and "not running" in error["message"]
    texts = [json.loads(e)["choices"][0].get("text") or json.loads(e)["choices"][0].get("delta", {}).get("content")
             for e in events[:-2]]
    assert "x" in texts


def test_engine_failure_without_streaming_is_503(alive_client):
    resp = alive_client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 503 and set(resp.json()["error"]) == {"message", "type", "param", "code"}


def test_metrics_expose_the_vllm_style_names(alive_client):
    alive_client.post("/v1/completions", json={"prompt": "hi"})  # fails mid-way: counted as an abort
    text = alive_client.get("/metrics").text
    for name in ("request_success_total", "request_aborts_total", "prompt_tokens_total", "generation_tokens_total",
                 "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
                 "request_time_per_output_token_seconds_bucket", "e2e_request_latency_seconds_bucket",
                 "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_queries_total",
                 "prefix_cache_hits_total", "num_preemptions_total"):
        assert f"\nafdserve:{name}" in text, name
    assert 'afdserve:request_aborts_total{model_name="fake"} 1.0' in text


def test_metrics_expose_the_tpot_slo_controller():
    from afdserve.engine.sla_control import TPOTController
    controller = TPOTController(0.1)
    for rows in range(1, 10):
        controller.observe(rows, 0, 0.01 + 0.005 * rows)
    controller.limits(4)
    controller.note_held()
    engine = FakeEngine()
    engine.stats = lambda: SchedulerStats(0, 3, 0.0, 0, 0, 0, controller.stats())
    text = TestClient(build_app(engine, "fake")).get("/metrics").text
    assert 'afdserve:sla_step_time_target_seconds{model_name="fake"} 0.085' in text
    assert 'afdserve:sla_step_time_model_seconds{model_name="fake",term="per_decode"} 0.005' in text
    assert 'afdserve:sla_max_num_seqs{model_name="fake"} 15.0' in text  # (85 - 10) / 5 rows
    assert 'afdserve:sla_held_steps_total{model_name="fake"} 1.0' in text
    assert "sla_" not in TestClient(build_app(FakeEngine(), "fake")).get("/metrics").text


class BlockingTokenizer(FakeTokenizer):
    """encode waits until released (at most 10 s): a stand-in for a long text being tokenized."""

    def __init__(self):
        import threading
        self.started, self.release = threading.Event(), threading.Event()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.started.set()
        self.release.wait(timeout=10)
        return super().encode(text, add_special_tokens)


def test_tokenization_leaves_the_event_loop_free():
    """While one request's prompt is being tokenized, /health answers: tokenization runs on a worker thread. Were it
    on the event loop, /health would wait for the tokenizer's release (10 s)."""
    import asyncio
    import time

    import httpx

    engine = FakeEngine(alive=True)
    engine.tokenizer = tokenizer = BlockingTokenizer()
    app = build_app(engine, "fake")

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            start = time.monotonic()
            tokenize = asyncio.ensure_future(client.post("/tokenize", json={"prompt": "hello"}))
            while not tokenizer.started.is_set():
                await asyncio.sleep(0.01)
            health = await client.get("/health")
            waited = time.monotonic() - start  # from before the tokenize request: a blocked loop counts
            tokenizer.release.set()
            return health.status_code, waited, (await tokenize).json()

    status, waited, tokens = asyncio.run(scenario())
    assert status == 200 and waited < 5
    assert tokens["count"] == 5


def test_a_body_over_the_request_limit_is_413():
    client = TestClient(build_app(FakeEngine(alive=True), "fake", max_request_bytes=1000))
    big = {"prompt": "x" * 2000, "max_tokens": 1}
    resp = client.post("/v1/completions", json=big)
    assert resp.status_code == 413 and "limit of 1000" in resp.json()["error"]["message"]
    assert resp.json()["error"]["code"] == 413
    # without a Content-Length (a chunked body), refused while it streams in
    chunked = client.post("/v1/completions", content=iter([json.dumps(big).encode()[:600]] * 3),
                          headers={"content-type": "application/json"})
    assert chunked.status_code == 413
    assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}).status_code != 413
    assert client.get("/health").status_code == 200
