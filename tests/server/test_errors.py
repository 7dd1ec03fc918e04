"""Bad input, one table: each case gets its status and an OpenAI-shaped error body (never FastAPI's 422), and the
server still answers a valid request afterwards."""
from __future__ import annotations

import httpx
import pytest

from .server_process import MAX_MODEL_LEN, MODEL_NAME

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]
LONG_PROMPT = "hello " * (MAX_MODEL_LEN + 10)


def case(name, path, body, status=400, param=None, message=None, method="POST"):
    """`body`: a dict sent as JSON, or bytes sent as they are."""
    return pytest.param(path, body, status, param, message, method, id=name)


CASES = [
    case("malformed-json", COMPLETIONS, b'{"prompt": "hi",'),
    case("invalid-utf8", COMPLETIONS, b'{"prompt": "\xff\xfe"}', message="UTF-8"),
    case("empty-body", COMPLETIONS, b""),
    case("body-not-an-object", COMPLETIONS, b"[1, 2, 3]"),
    case("missing-prompt", COMPLETIONS, {"model": MODEL_NAME}, param="prompt"),
    case("prompt-wrong-type", COMPLETIONS, {"prompt": 123}, param="prompt"),
    case("prompt-mixed-list", COMPLETIONS, {"prompt": [1, "a"]}, param="prompt"),
    case("prompt-empty-string", COMPLETIONS, {"prompt": ""}, param="prompt"),
    case("prompt-empty-list", COMPLETIONS, {"prompt": []}, param="prompt"),
    case("prompt-token-out-of-vocab", COMPLETIONS, {"prompt": [1, 10**9]}, param="prompt"),
    case("prompt-over-context", COMPLETIONS, {"prompt": LONG_PROMPT}, param="prompt",
         message="maximum context length"),
    case("prompt-10mb", COMPLETIONS, {"prompt": "x" * 10_000_000}, param="prompt", message="at least"),
    case("chat-10mb", CHAT, {"messages": [{"role": "user", "content": "x" * 10_000_000}]}, param="messages",
         message="at least"),
    case("prompt-plus-max-tokens-over-context", COMPLETIONS,
         {"prompt": "hello there, how are you", "max_tokens": MAX_MODEL_LEN - 1},
         param="prompt", message="maximum context length"),
    case("negative-max-tokens", COMPLETIONS, {"prompt": "hi", "max_tokens": -1}, param="max_tokens"),
    case("max-tokens-zero-without-echo", COMPLETIONS, {"prompt": "hi", "max_tokens": 0}, param="max_tokens"),
    case("max-tokens-alone-over-context", COMPLETIONS, {"prompt": "hi", "max_tokens": 10**12}, param="max_tokens",
         message="maximum context length"),
    case("chat-max-completion-tokens-over-context", CHAT, {"messages": USER, "max_completion_tokens": 10**12},
         param="max_completion_tokens", message="maximum context length"),
    case("max-tokens-wrong-type", COMPLETIONS, {"prompt": "hi", "max_tokens": "lots"}, param="max_tokens"),
    case("n-zero", COMPLETIONS, {"prompt": "hi", "n": 0}, param="n"),
    case("n-absurd", COMPLETIONS, {"prompt": "hi", "n": 10000}, param="n"),
    case("top-p-2", COMPLETIONS, {"prompt": "hi", "top_p": 2}, param="top_p"),
    case("temperature-negative", COMPLETIONS, {"prompt": "hi", "temperature": -1}, param="temperature"),
    case("temperature-wrong-type", COMPLETIONS, {"prompt": "hi", "temperature": "hot"}, param="temperature"),
    # Python's JSON parser reads NaN, Infinity and 1e400 (infinite): each a number no range check catches.
    case("temperature-nan", COMPLETIONS, b'{"prompt": "hi", "temperature": NaN}', param="temperature"),
    case("temperature-infinity", COMPLETIONS, b'{"prompt": "hi", "temperature": Infinity}', param="temperature"),
    case("repetition-penalty-1e400", COMPLETIONS, b'{"prompt": "hi", "repetition_penalty": 1e400}',
         param="repetition_penalty"),
    case("json-nested-2000-deep", COMPLETIONS, b'{"prompt": ' + b"[" * 2000 + b"]" * 2000 + b"}",
         message="nests too deeply"),
    case("prompt-lone-surrogate", COMPLETIONS, b'{"prompt": "abc\\ud800def"}', message="lone surrogate"),
    case("prompt-list-lone-surrogate", COMPLETIONS, b'{"prompt": ["ok", "abc\\ud800def"]}', message="lone surrogate"),
    case("chat-lone-surrogate", CHAT, b'{"messages": [{"role": "user", "content": "abc\\ud800def"}]}',
         message="lone surrogate"),
    case("tokenize-lone-surrogate", "/tokenize", b'{"prompt": "\\udfff"}', message="lone surrogate"),
    case("chat-frequency-penalty-nan", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], '
                                             b'"frequency_penalty": NaN}', param="frequency_penalty"),
    case("top-k-negative", COMPLETIONS, {"prompt": "hi", "top_k": -5}, param="top_k"),
    case("presence-penalty-out-of-range", COMPLETIONS, {"prompt": "hi", "presence_penalty": 5},
         param="presence_penalty"),
    case("min-tokens-over-max-tokens", COMPLETIONS, {"prompt": "hi", "max_tokens": 4, "min_tokens": 8},
         param="min_tokens"),
    case("logprobs-over-cap", COMPLETIONS, {"prompt": "hi", "logprobs": 21}, param="logprobs"),
    case("logprobs-negative", COMPLETIONS, {"prompt": "hi", "logprobs": -1}, param="logprobs"),
    case("stop-wrong-type", COMPLETIONS, {"prompt": "hi", "stop": 5}, param="stop"),
    case("seed-over-int64", COMPLETIONS, {"prompt": "hi", "seed": 2**70}, param="seed"),
    case("stream-options-without-stream", COMPLETIONS, {"prompt": "hi", "stream_options": {"include_usage": True}},
         param="stream_options"),
    case("stream-continuous-usage-unsupported", COMPLETIONS,
         {"prompt": "hi", "stream": True, "stream_options": {"continuous_usage_stats": True}}, param="stream_options",
         message="continuous_usage_stats"),
    case("suffix-unsupported", COMPLETIONS, {"prompt": "hi", "suffix": "!"}, param="suffix"),
    case("best-of-unsupported", COMPLETIONS, {"prompt": "hi", "best_of": 3}, param="best_of"),
    case("chat-response-format-json", CHAT, {"messages": USER, "response_format": {"type": "json_object"}},
         param="response_format"),
    case("logit-bias-key-not-a-token", COMPLETIONS, {"prompt": "hi", "logit_bias": {"hello": 5}}, param="logit_bias"),
    case("logit-bias-out-of-range", COMPLETIONS, {"prompt": "hi", "logit_bias": {"5": 500}}, param="logit_bias"),
    case("logit-bias-token-out-of-vocab", COMPLETIONS, {"prompt": "hi", "logit_bias": {str(10**9): 5}},
         param="logit_bias"),
    # Checked before the stream starts: a streaming request gets the 400 a non-streaming one gets, not 200 + an event.
    case("stream-stop-token-out-of-vocab", COMPLETIONS, {"prompt": "hi", "stream": True, "stop_token_ids": [10**9]},
         param="stop_token_ids"),
    case("stream-logit-bias-token-out-of-vocab", COMPLETIONS,
         {"prompt": "hi", "stream": True, "logit_bias": {str(10**9): 5}}, param="logit_bias"),
    case("chat-stream-stop-token-out-of-vocab", CHAT, {"messages": USER, "stream": True, "stop_token_ids": [10**9]},
         param="stop_token_ids"),
    case("unknown-model", COMPLETIONS, {"model": "gpt-4", "prompt": "hi"}, 404, "model",
         "The model `gpt-4` does not exist."),
    case("chat-unknown-model", CHAT, {"model": "gpt-4", "messages": USER}, 404, "model",
         "The model `gpt-4` does not exist."),
    case("chat-missing-messages", CHAT, {"model": MODEL_NAME}, param="messages"),
    case("chat-empty-messages", CHAT, {"messages": []}, param="messages"),
    case("chat-unknown-role", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, param="messages"),
    case("chat-content-wrong-type", CHAT, {"messages": [{"role": "user", "content": 123}]}, param="messages"),
    case("chat-image-part", CHAT, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, param="messages"),
    case("chat-top-logprobs-without-logprobs", CHAT, {"messages": USER, "top_logprobs": 2}),
    case("chat-tools", CHAT, {"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]},
         param="tools", message="tool calling"),
    case("chat-top-logprobs-over-cap", CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 50},
         param="top_logprobs"),
    case("chat-max-completion-tokens-zero", CHAT, {"messages": USER, "max_completion_tokens": 0},
         param="max_completion_tokens"),
    case("chat-over-context", CHAT, {"messages": [{"role": "user", "content": LONG_PROMPT}]}, param="messages",
         message="maximum context length"),
    case("tokenize-unknown-model", "/tokenize", {"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    case("tokenize-no-input", "/tokenize", {"model": MODEL_NAME}),
    case("detokenize-out-of-vocab", "/detokenize", {"tokens": [-1]}, param="tokens"),
    case("unknown-route", "/v1/nothing-here", {}, 404),
    case("wrong-method", COMPLETIONS, None, 405, method="GET"),
]


@pytest.mark.parametrize("path, body, status, param, message, method", CASES)
def test_bad_input_gets_an_openai_error(api_server, path, body, status, param, message, method):
    if isinstance(body, bytes):
        resp = httpx.request(method, api_server.url(path), content=body,
                             headers={"Content-Type": "application/json"}, timeout=30)
    else:
        resp = httpx.request(method, api_server.url(path), json=body, timeout=30)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and isinstance(error["message"], str) and error["message"]
    assert error["type"] == {400: "BadRequestError", 404: "NotFoundError"}.get(status, error["type"])
    if param is not None:
        assert error["param"] == param, error
    if message is not None:
        assert message in error["message"]


def test_bad_input_table_is_large_and_the_server_still_serves(api_server):
    assert len(CASES) >= 20
    resp = httpx.post(api_server.url(COMPLETIONS), json={"prompt": "hi", "max_tokens": 2}, timeout=60)
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 2
    assert httpx.get(api_server.url("/health")).status_code == 200

