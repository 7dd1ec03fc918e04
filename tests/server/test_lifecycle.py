"""Server processes of their own: --api-key (401 on /v1/* without the key), and SIGTERM while a request streams
(the stream completes or ends cleanly, new connections are refused, the process exits 0)."""
from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import openai
import pytest
from openai import OpenAI

from .server_process import MODEL_NAME, ServerProcess

API_KEY = "test-key-123"
SMALL_POOL = ("--num-kv-blocks", "64")


@pytest.fixture(scope="module")
def keyed_server(smollm2_dir, tmp_path_factory):
    with ServerProcess(smollm2_dir, tmp_path_factory.mktemp("keyed") / "server.log", "--api-key", API_KEY,
                       *SMALL_POOL) as server:
        yield server


def test_api_key_is_required_on_v1(keyed_server):
    body = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        resp = httpx.post(keyed_server.url("/v1/completions"), json=body, headers=headers)
        assert resp.status_code == 401
        assert resp.json()["error"]["code"] == 401 and resp.json()["error"]["type"] == "AuthenticationError"
    assert httpx.get(keyed_server.url("/v1/models")).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=keyed_server.url("/v1"), api_key="wrong", max_retries=0).models.list()
    client = OpenAI(base_url=keyed_server.url("/v1"), api_key=API_KEY, max_retries=0)
    assert client.completions.create(**body).usage.completion_tokens == 2
    # outside /v1 the server stays open, as vLLM's does
    for path in ("/health", "/metrics", "/version"):
        assert httpx.get(keyed_server.url(path)).status_code == 200
    assert httpx.post(keyed_server.url("/tokenize"), json={"prompt": "hi"}).status_code == 200


def _read_stream(server: ServerProcess, body: dict, first_chunk: threading.Event, result: dict) -> None:
    try:
        with httpx.stream("POST", server.url("/v1/completions"), json=body, timeout=120) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    result.setdefault("chunks", []).append(json.loads(line[6:]))
                    first_chunk.set()
                elif line == "data: [DONE]":
                    result["done"] = True
    except httpx.HTTPError as e:  # a drain that ran out of time may cut the connection
        result["error"] = e
    finally:
        first_chunk.set()


def _sigterm_while_streaming(server: ServerProcess, max_tokens: int) -> tuple[dict, int, float]:
    body = {"model": MODEL_NAME, "prompt": "Tell me a long story:", "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True}
    first_chunk, result = threading.Event(), {}
    reader = threading.Thread(target=_read_stream, args=(server, body, first_chunk, result))
    reader.start()
    assert first_chunk.wait(60) and result.get("chunks"), result
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(httpx.ConnectError):  # draining: the listening socket is closed
        httpx.get(server.url("/health"), timeout=5)
    reader.join(120)
    status = server.proc.wait(60)
    return result, status, time.monotonic() - started


def test_sigterm_lets_the_streaming_request_finish_then_exits_0(smollm2_dir, tmp_path):
    with ServerProcess(smollm2_dir, tmp_path / "server.log", *SMALL_POOL) as server:
        result, status, _ = _sigterm_while_streaming(server, max_tokens=48)
    assert status == 0, server.log()
    assert result.get("done") and "error" not in result, result
    tokens = sum(1 for chunk in result["chunks"] for _ in chunk["choices"])
    assert result["chunks"][-1]["choices"][0]["finish_reason"] == "length" and tokens <= 48


def test_sigterm_aborts_what_outlives_the_drain_timeout_and_exits_0(smollm2_dir, tmp_path):
    with ServerProcess(smollm2_dir, tmp_path / "server.log", *SMALL_POOL, "--drain-timeout", "1") as server:
        result, status, elapsed = _sigterm_while_streaming(server, max_tokens=900)
    assert status == 0, server.log()
    assert elapsed < 30, "the drain should give up after about a second"
    # the stream ends cleanly: an error event saying why, then [DONE]
    assert result.get("done") and "error" not in result, result
    assert result["chunks"][-1]["error"]["code"] == 503, result["chunks"][-1]
    assert "Traceback" not in server.log() and "aborted 1 request(s)" in server.log()
