"""The OpenAI-compatible API driven by the official `openai` client against the real server: completions and chat,
streaming and not, n=2, seeds, stop strings, logprobs, echo, the prompt forms; greedy text equals the offline API's.

Requests run one at a time, so the server's batches hold one request, as the offline reference's do."""
from __future__ import annotations

import httpx
import pytest
from openai import OpenAI

from afdserve import LLM, SamplingParams

from .server_process import MAX_MODEL_LEN, MODEL_NAME, metric

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
MESSAGES = [{"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Name three primary colours."}]
NO_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def client(api_server) -> OpenAI:
    return OpenAI(base_url=api_server.url("/v1"), api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(smollm2_dir) -> LLM:
    return LLM(str(smollm2_dir), dtype="float32", num_kv_blocks=64, max_model_len=MAX_MODEL_LEN)


def offline(reference: LLM, prompt, **params):
    return reference.generate([prompt], SamplingParams(**params), use_tqdm=False)[0]


def complete(client: OpenAI, prompt, **kwargs):
    return client.completions.create(model=MODEL_NAME, prompt=prompt, **kwargs)


def chat(client: OpenAI, messages=MESSAGES, **kwargs):
    return client.chat.completions.create(model=MODEL_NAME, messages=messages, **kwargs)


# ---- completions ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", PROMPTS)
def test_completion_greedy_text_equals_offline(client, reference, prompt):
    want = offline(reference, prompt, temperature=0, max_tokens=24)
    got = complete(client, prompt, temperature=0, max_tokens=24)
    assert got.id.startswith("cmpl-") and got.model == MODEL_NAME and got.object == "text_completion"
    assert got.choices[0].text == want.outputs[0].text
    assert got.choices[0].finish_reason == want.outputs[0].finish_reason
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    assert got.usage.completion_tokens == len(want.outputs[0].token_ids)
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_completion_stream_equals_non_stream(client):
    full = complete(client, PROMPTS[0], temperature=0, max_tokens=20)
    chunks = list(complete(client, PROMPTS[0], temperature=0, max_tokens=20, stream=True,
                           stream_options={"include_usage": True}))
    body = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in body) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in body if c.choices[0].finish_reason] == [full.choices[0].finish_reason]
    assert all(c.usage is None for c in body)
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()


def test_usage_carries_the_request_cost_and_metrics_count_it(api_server, client, reference):
    """usage.afdserve_cost is the engine's count for the request (checked against a hand count in
    tests/engine/test_request_cost.py), and the /metrics counters grow by exactly that."""
    want = offline(reference, PROMPTS[1], temperature=0, max_tokens=8, ignore_eos=True).cost
    before = api_server.metrics()
    got = complete(client, PROMPTS[1], temperature=0, max_tokens=8, extra_body=NO_EOS).usage.afdserve_cost
    after = api_server.metrics()
    assert got == pytest.approx(want.as_dict())  # the openai client keeps unknown fields as a dict

    def grew(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)
    assert grew("afdserve:compute_flops_total", kind="linear") == got["linear_flops"]
    assert grew("afdserve:compute_flops_total", kind="attention") == got["attention_flops"]
    assert grew("afdserve:kv_read_bytes_total") == got["kv_bytes_read"]
    chat_out = chat(client, temperature=0, max_tokens=4)
    want_chat = reference.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    assert chat_out.usage.afdserve_cost == pytest.approx(want_chat.cost.as_dict())


def test_stream_without_usage_has_no_usage_chunk(client):
    chunks = list(complete(client, PROMPTS[0], temperature=0, max_tokens=4, stream=True))
    assert chunks and all(c.choices and c.usage is None for c in chunks)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_the_text(client, stream):
    greedy = complete(client, PROMPTS[0], temperature=0, max_tokens=24, extra_body=NO_EOS).choices[0].text
    stop = greedy.split()[2]
    expected = greedy[:greedy.find(stop)]
    kwargs = dict(temperature=0, max_tokens=24, stop=[stop, "@@never@@"], extra_body=NO_EOS)
    if stream:
        chunks = [c for c in complete(client, PROMPTS[0], stream=True, **kwargs)]
        text = "".join(c.choices[0].text for c in chunks)
        last = chunks[-1].choices[0]
    else:
        last = complete(client, PROMPTS[0], **kwargs).choices[0]
        text = last.text
    assert text == expected
    assert last.finish_reason == "stop" and last.stop_reason == stop


def test_n2_and_seeded_reproducibility(client):
    kwargs = dict(temperature=1.0, max_tokens=12, n=2, seed=1234, extra_body=NO_EOS)
    first, again = complete(client, PROMPTS[1], **kwargs), complete(client, PROMPTS[1], **kwargs)
    assert sorted(c.index for c in first.choices) == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.usage.completion_tokens == 24
    streamed = {0: "", 1: ""}
    for chunk in complete(client, PROMPTS[1], stream=True, **kwargs):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert [streamed[0], streamed[1]] == [c.text for c in first.choices]
    others = {complete(client, PROMPTS[1], temperature=1.0, max_tokens=12, seed=s).choices[0].text
              for s in (1, 2, 3)}
    assert len(others | {first.choices[0].text}) > 1, "different seeds should sample differently"


def test_completion_logprobs_equal_offline(client, reference):
    got = complete(client, PROMPTS[0], temperature=0, max_tokens=8, logprobs=3, extra_body=NO_EOS).choices[0]
    want = offline(reference, PROMPTS[0], temperature=0, max_tokens=8, logprobs=3, ignore_eos=True).outputs[0]
    lp = got.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    assert "".join(lp.tokens) == got.text
    for i, (token, logprob, top) in enumerate(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs)):
        assert 3 <= len(top) <= 4 and top[token] == logprob == max(top.values())  # greedy: the top token
        assert logprob == pytest.approx(want.logprobs[i][want.token_ids[i]].logprob, abs=1e-4)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]


def test_echo_returns_the_prompt_with_its_logprobs(client, reference):
    prompt = "The quick brown fox jumps"
    plain = complete(client, prompt, temperature=0, max_tokens=4, extra_body=NO_EOS).choices[0].text
    resp = complete(client, prompt, temperature=0, max_tokens=4, echo=True, logprobs=2, extra_body=NO_EOS)
    choice, num_prompt = resp.choices[0], resp.usage.prompt_tokens
    assert choice.text == prompt + plain
    lp = choice.logprobs
    assert len(lp.tokens) == num_prompt + 4 and resp.usage.completion_tokens == 4
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = offline(reference, prompt, temperature=0, max_tokens=1, prompt_logprobs=2)
    for i in range(1, num_prompt):
        expected = want.prompt_logprobs[i][want.prompt_token_ids[i]].logprob
        assert lp.token_logprobs[i] == pytest.approx(expected, abs=1e-4)
        assert 2 <= len(lp.top_logprobs[i]) <= 3
    assert all(b - a == len(t) for a, b, t in zip(lp.text_offset, lp.text_offset[1:], lp.tokens))
    # echo with max_tokens=0: the prompt alone, scored (how evaluation harnesses use it)
    only = complete(client, prompt, max_tokens=0, echo=True, logprobs=0)
    assert only.choices[0].text == prompt and only.usage.completion_tokens == 0
    assert only.choices[0].logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:num_prompt], abs=1e-5)
    streamed = "".join(c.choices[0].text for c in complete(client, prompt, temperature=0, max_tokens=4, echo=True,
                                                           stream=True, extra_body=NO_EOS))
    assert streamed == prompt + plain


def test_prompt_forms_agree(client, api_server):
    ids = [httpx.post(api_server.url("/tokenize"), json={"prompt": p}).json()["tokens"] for p in PROMPTS]
    greedy = dict(temperature=0, max_tokens=8)
    texts = [complete(client, p, **greedy).choices[0].text for p in PROMPTS]
    assert complete(client, ids[0], **greedy).choices[0].text == texts[0]
    for prompts in (PROMPTS, ids):
        resp = complete(client, prompts, n=2, **greedy)
        assert [c.index for c in resp.choices] == [0, 1, 2, 3]
        assert [c.text for c in resp.choices] == [texts[0], texts[0], texts[1], texts[1]]
        assert resp.usage.prompt_tokens == sum(len(i) for i in ids)
    streamed = ["", "", "", ""]
    for chunk in complete(client, ids, n=2, stream=True, **greedy):
        streamed[chunk.choices[0].index] += chunk.choices[0].text
    assert streamed == [texts[0], texts[0], texts[1], texts[1]]


def test_every_sampling_parameter_is_accepted(client, reference):
    resp = complete(client, PROMPTS[1], max_tokens=8, temperature=0.7, top_p=0.9, presence_penalty=0.5,
                    frequency_penalty=0.3, seed=3, user="tester",
                    extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 8,
                                "ignore_eos": True, "some_future_field": {"x": 1}})
    assert resp.usage.completion_tokens == 8 and resp.choices[0].finish_reason == "length"
    # stop_token_ids: the greedy output's first token id that does not occur before it
    ids = offline(reference, PROMPTS[1], temperature=0, max_tokens=8, ignore_eos=True).outputs[0].token_ids
    at = next(i for i in range(2, 8) if ids[i] not in ids[:i])
    resp = complete(client, PROMPTS[1], temperature=0, max_tokens=8, extra_body={"stop_token_ids": [ids[at]]})
    assert resp.usage.completion_tokens == at + 1
    assert resp.choices[0].finish_reason == "stop" and resp.choices[0].stop_reason == ids[at]


def test_logit_bias_steers_completions_and_chat(client, reference):
    """+100 on a token the greedy output never picks makes every token that one; -100 on each greedy token in turn
    moves the first token to the next best, as offline."""
    greedy = offline(reference, PROMPTS[0], temperature=0, max_tokens=4, ignore_eos=True).outputs[0].token_ids
    forced = next(t for t in range(100, 200) if t not in greedy)
    resp = complete(client, PROMPTS[0], temperature=0, max_tokens=3, logit_bias={str(forced): 100},
                    extra_body=NO_EOS)
    assert resp.choices[0].text == reference.tokenizer.decode([forced] * 3)
    banned = {str(greedy[0]): -100}
    resp = complete(client, PROMPTS[0], temperature=0, max_tokens=1, logit_bias=banned, logprobs=0)
    want = offline(reference, PROMPTS[0], temperature=0, max_tokens=1, logit_bias={greedy[0]: -100})
    assert resp.choices[0].text == want.outputs[0].text and want.outputs[0].token_ids[0] != greedy[0]
    msg = chat(client, temperature=0, max_tokens=2, logit_bias={str(forced): 100})
    assert msg.choices[0].message.content == reference.tokenizer.decode([forced] * 2)


def test_chat_tools_with_tool_choice_none_are_ignored(client):
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    plain = chat(client, temperature=0, max_tokens=4)
    resp = chat(client, temperature=0, max_tokens=4, tools=tools, tool_choice="none")
    assert resp.choices[0].message.content == plain.choices[0].message.content
    assert not resp.choices[0].message.tool_calls


# ---- chat -----------------------------------------------------------------------------------------------------
def test_chat_greedy_text_equals_offline(client, reference):
    want = reference.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    got = chat(client, temperature=0, max_tokens=24)
    assert got.id.startswith("chatcmpl-") and got.object == "chat.completion"
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.outputs[0].text
    assert got.choices[0].finish_reason == want.outputs[0].finish_reason
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    assert got.usage.completion_tokens == len(want.outputs[0].token_ids)


def test_chat_stream_equals_non_stream(client):
    full = chat(client, temperature=0, max_tokens=20)
    chunks = list(chat(client, temperature=0, max_tokens=20, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    body = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in body) == full.choices[0].message.content
    assert body[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()


def test_chat_content_parts_roles_and_max_completion_tokens(client, api_server):
    as_parts = [MESSAGES[0], {"role": "user", "content": [{"type": "text", "text": MESSAGES[1]["content"]}]}]
    assert (chat(client, as_parts, temperature=0, max_tokens=8).choices[0].message.content
            == chat(client, temperature=0, max_tokens=8).choices[0].message.content)
    history = MESSAGES + [{"role": "assistant", "content": "Red, blue, yellow."},
                          {"role": "user", "content": [{"type": "text", "text": "And"}, {"type": "text",
                                                                                        "text": "secondary?"}]}]
    resp = chat(client, history, max_completion_tokens=5, max_tokens=50, extra_body=NO_EOS)
    assert resp.usage.completion_tokens == 5  # max_completion_tokens wins over the deprecated max_tokens
    tokenized = httpx.post(api_server.url("/tokenize"), json={"model": MODEL_NAME, "messages": history}).json()
    assert tokenized["count"] == resp.usage.prompt_tokens


def test_chat_n2_seeded_stream_equals_non_stream(client):
    kwargs = dict(temperature=1.0, max_tokens=10, n=2, seed=99)
    full = chat(client, **kwargs)
    assert sorted(c.index for c in full.choices) == [0, 1]
    texts, finishes = {0: "", 1: ""}, {}
    for chunk in chat(client, stream=True, **kwargs):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert [texts[0], texts[1]] == [c.message.content for c in full.choices]
    assert [finishes[0], finishes[1]] == [c.finish_reason for c in full.choices]


def test_chat_logprobs_and_top_logprobs(client):
    resp = chat(client, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3, extra_body=NO_EOS)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens == 8
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert entry.token == entry.top_logprobs[0].token and entry.logprob == tops[0]  # greedy
        assert entry.bytes == list(entry.token.encode())
    streamed = []
    for chunk in chat(client, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3, stream=True,
                      extra_body=NO_EOS):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]
    plain = chat(client, temperature=0, max_tokens=4, logprobs=True).choices[0].logprobs.content
    assert all(e.top_logprobs == [] for e in plain)


# ---- models, tokenizer, health --------------------------------------------------------------------------------
def test_models_tokenize_detokenize_health_version(client, api_server):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME] and models[0].max_model_len == MAX_MODEL_LEN
    tok = httpx.post(api_server.url("/tokenize"), json={"model": MODEL_NAME, "prompt": PROMPTS[0]}).json()
    assert tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] == MAX_MODEL_LEN
    detok = httpx.post(api_server.url("/detokenize"), json={"model": MODEL_NAME, "tokens": tok["tokens"]}).json()
    assert detok == {"prompt": PROMPTS[0]}
    assert httpx.get(api_server.url("/health")).status_code == 200
    assert httpx.get(api_server.url("/version")).json()["version"]


def test_a_request_attention_policy_gets_the_offline_apis_tokens(client, reference, api_server):
    """afdserve's "attention_policy" body field: a DELTA request on a 3-page budget (of the prompt's ~20 pages) gets
    the tokens the offline API gives with that policy; a bad policy is a 400 naming the field."""
    from pydoc_data.topics import topics
    prompt = topics["assert"][:1200]
    policy = {"name": "delta", "budget_pages": 3, "recent_pages": 1}
    want = offline(reference, prompt, temperature=0, max_tokens=12, ignore_eos=True, attention_policy=policy)
    resp = complete(client, prompt, temperature=0, max_tokens=12, extra_body={**NO_EOS, "attention_policy": policy})
    assert resp.choices[0].text == want.outputs[0].text
    r = httpx.post(api_server.url("/v1/chat/completions"), json={
        "model": MODEL_NAME, "messages": MESSAGES, "attention_policy": {"name": "delta", "budget": 3}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "attention_policy", r.text
    assert "budget" in r.json()["error"]["message"]
