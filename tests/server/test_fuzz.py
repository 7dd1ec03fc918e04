"""Fuzzing the HTTP API: request bodies drawn from the API's own JSON schemas (the pydantic models behind
/v1/completions, /v1/chat/completions and /tokenize: `schema_strategy` below), arbitrary JSON and raw bytes,
sent to the real app over a real engine. Every answer must be a 2xx or a 4xx in the OpenAI error shape, never a 5xx;
every stream must end with [DONE]; afterwards /health is 200 and every KV block is free.

The engine runs a tiny random Llama with SmolLM2's tokenizer and chat template, so that prompts are tokenized and
templated for real while generation stays fast. The examples are derandomized (the same ones in every run) and
bounded: the module took 28 s with 60 examples a test on the 2-core machine, 109 s with 100 while CI ran beside it."""
from __future__ import annotations

import json
import shutil
import time

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_tiny_model
from afdserve.engine.async_engine import AsyncEngine
from afdserve.engine.llm import engine_config
from afdserve.engine.server.api_server import build_app
from afdserve.engine.server.protocol import ChatCompletionRequest, CompletionRequest, TokenizeRequest

MAX_MODEL_LEN = 128
TEXT = st.text(st.characters(exclude_categories=()), max_size=40)  # lone surrogates too: JSON escapes carry them
FUZZ = settings(max_examples=80, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def client(smollm2_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-fuzz")
    vocab = json.loads((smollm2_dir / "config.json").read_text())["vocab_size"]
    make_tiny_model(directory, "llama", vocab_size=vocab, num_hidden_layers=1)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # SmolLM2's tokenizer and chat template
        shutil.copy(smollm2_dir / name, directory / name)
    engine = AsyncEngine(engine_config(model=str(directory), dtype="float32", max_model_len=MAX_MODEL_LEN,
                                       num_kv_blocks=64))
    with TestClient(build_app(engine, "tiny")) as test_client:
        yield test_client, engine
    engine.shutdown()


def schema_strategy(schema: dict, defs: dict) -> st.SearchStrategy:
    """Values valid against the subset of JSON Schema that pydantic writes for the API's models ($ref, anyOf, const,
    enum, bounds, required and optional properties); numbers include NaN and the infinities, which JSON cannot
    carry but Python's encoder writes, as some clients do."""
    if "$ref" in schema:
        return schema_strategy(defs[schema["$ref"].rsplit("/", 1)[1]], defs)
    if "anyOf" in schema:
        return st.one_of([schema_strategy(option, defs) for option in schema["anyOf"]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "string":
        return TEXT
    if kind == "integer":
        return st.integers(schema.get("minimum"), schema.get("maximum"))
    if kind == "number":
        return st.floats()
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        return st.lists(schema_strategy(schema.get("items", {}), defs), min_size=schema.get("minItems", 0),
                        max_size=min(schema.get("maxItems", 4), 4))
    if kind == "object":
        props = {name: schema_strategy(sub, defs) for name, sub in schema.get("properties", {}).items()}
        required = set(schema.get("required", ()))
        if not props and isinstance(schema.get("additionalProperties"), dict):
            return st.dictionaries(st.text(max_size=8), schema_strategy(schema["additionalProperties"], defs),
                                   max_size=4)
        return st.fixed_dictionaries({k: v for k, v in props.items() if k in required},
                                     optional={k: v for k, v in props.items() if k not in required})
    return JSON_VALUES  # no constraint


def schema_bodies(model) -> st.SearchStrategy:
    schema = model.model_json_schema()
    return schema_strategy(schema, schema.get("$defs", {}))


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                       max_size=4),
                           max_leaves=12)


def post(client, path: str, body) -> object:
    """POSTs `body` as JSON as Python writes it (NaN and Infinity included), or raw bytes as they are."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8", "surrogatepass")
    return client.post(path, content=content, headers={"content-type": "application/json"})


def check_answer(response) -> None:
    """A 2xx whose SSE stream (if any) is well formed, or a 4xx in the OpenAI error shape; never a 5xx."""
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert isinstance(error["type"], str) and error["code"] == response.status_code
        return
    if response.headers["content-type"].startswith("text/event-stream"):
        events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
        assert events[-1] == "[DONE]", events[-3:]
        for event in events[:-1]:
            payload = json.loads(event)
            if "error" in payload:  # an error after the stream began: the same shape, status in `code`
                assert isinstance(payload["error"]["message"], str) and payload["error"]["code"] < 500
    else:
        response.json()


@FUZZ
@given(body=schema_bodies(CompletionRequest))
def test_completions_from_the_schema(client, body):
    check_answer(post(client[0], "/v1/completions", body))


@FUZZ
@given(body=schema_bodies(ChatCompletionRequest))
def test_chat_completions_from_the_schema(client, body):
    check_answer(post(client[0], "/v1/chat/completions", body))


@FUZZ
@given(body=schema_bodies(TokenizeRequest))
def test_tokenize_from_the_schema(client, body):
    check_answer(post(client[0], "/tokenize", body))


@FUZZ
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]),
       body=JSON_VALUES | st.binary(max_size=64))
def test_any_json_or_bytes(client, path, body):
    check_answer(post(client[0], path, body))


def test_after_the_fuzzing_the_server_is_healthy_and_every_block_free(client):
    test_client, engine = client
    assert test_client.get("/health").status_code == 200
    deadline = time.monotonic() + 30
    while (stats := engine.stats()).num_running or stats.num_waiting or stats.kv_usage:
        assert time.monotonic() < deadline, stats
        time.sleep(0.1)
    assert stats.kv_usage == 0
