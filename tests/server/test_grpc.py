"""The gRPC endpoint, in process: an AsyncEngine over the real SmolLM2 behind start_grpc_server on a free port,
driven by a client built from the committed .proto stubs. One event loop for the module runs server and clients."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from afdserve import LLM, SamplingParams
from afdserve.engine.async_engine import AsyncEngine
from afdserve.engine.llm import engine_config
from afdserve.engine.server.grpc_server import start_grpc_server
from afdserve.engine.server.metrics import ServerMetrics
from afdserve.engine.server.serving_common import ServingContext
from afdserve.engine.server.proto.afdserve.v1 import generation_pb2 as pb
from afdserve.engine.server.proto.afdserve.v1 import generation_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]
MODEL_NAME = "smollm2-test"
PROMPT = "The capital of France is"
LONG_PROMPT = " ".join(["The capital of France is Paris, and the capital of Italy is Rome."] * 8)  # ~8 pages
QUEST_POLICY = {"name": "quest", "budget_pages": 2}
ENGINE_ARGS = dict(dtype="float32", max_model_len=256, num_kv_blocks=64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """A grpc.aio server on its own event loop; `call(fn)` runs `fn(stub, channel)` on that loop."""

    def __init__(self, engine, **context):
        self.engine = engine
        self.ctx = ServingContext(engine, MODEL_NAME, ServerMetrics(MODEL_NAME, lambda: engine.stats(), lambda: None),
                                  **context)
        self.loop = asyncio.new_event_loop()
        self.port = free_port()
        self.server = self.loop.run_until_complete(start_grpc_server(self.ctx, "127.0.0.1", self.port))

    def call(self, fn):
        async def run():
            async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
                return await fn(pb_grpc.GenerationStub(channel), channel)
        return self.loop.run_until_complete(asyncio.wait_for(run(), timeout=60))

    def close(self) -> None:
        self.loop.run_until_complete(self.server.stop(None))
        self.loop.run_until_complete(asyncio.sleep(0.6))  # lets the health poller see the stop
        self.loop.close()


@pytest.fixture(scope="module")
def async_engine(smollm2_dir):
    engine = AsyncEngine(engine_config(model=str(smollm2_dir), **ENGINE_ARGS))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def served(async_engine):
    s = Served(async_engine)
    yield s
    s.close()


@pytest.fixture(scope="module")
def offline(smollm2_dir):
    """The offline API's greedy outputs for PROMPT (text and token ids), the oracle for the server's."""
    llm = LLM(str(smollm2_dir), **ENGINE_ARGS)
    params = SamplingParams(temperature=0.0, max_tokens=12)
    prompt_ids = llm.tokenizer.encode(PROMPT)
    text_out, ids_out = llm.generate([PROMPT, prompt_ids], params, use_tqdm=False)
    sparse_out = llm.generate([LONG_PROMPT], SamplingParams(temperature=0.0, max_tokens=12,
                                                            attention_policy=QUEST_POLICY), use_tqdm=False)[0]
    llm.engine.shutdown()
    return SimpleNamespace(text=text_out, ids=ids_out, prompt_ids=prompt_ids, sparse=sparse_out)


def greedy(max_tokens: int = 12, **kw) -> pb.SamplingParams:
    return pb.SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


async def collect(call) -> list[pb.GenerateResponse]:
    return [r async for r in call]


def kv_pool_is_full(engine: AsyncEngine, wait_s: float = 5.0) -> bool:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if engine.engine.core.kv.num_free_blocks == engine.engine.num_kv_blocks:
            return True
        time.sleep(0.05)
    return False


# ---- Generate -----------------------------------------------------------------------------------------------
def test_streaming_generate_matches_offline(served, offline):
    request = pb.GenerateRequest(model=MODEL_NAME, text=PROMPT, sampling=greedy(), stream=True, request_id="g-1")
    responses = served.call(lambda stub, _: collect(stub.Generate(request)))
    kinds = [r.WhichOneof("response") for r in responses]
    assert kinds[-1] == "complete" and set(kinds[:-1]) == {"chunk"} and len(kinds) > 2, kinds
    assert all(r.request_id == "g-1" for r in responses)
    chunks = [r.chunk for r in responses[:-1]]
    want = offline.text.outputs[0]
    assert "".join(c.text for c in chunks) == want.text
    assert [t for c in chunks for t in c.token_ids] == want.token_ids
    complete = responses[-1].complete
    assert (complete.index, complete.finish_reason) == (0, want.finish_reason)
    assert complete.prompt_tokens == len(offline.prompt_ids)
    assert complete.completion_tokens == len(want.token_ids) == 12


def test_attention_policy_matches_offline(served, offline):
    """SamplingParams.attention_policy as JSON text: Quest on 2 of the prompt's ~8 pages, as offline."""
    request = pb.GenerateRequest(text=LONG_PROMPT, sampling=greedy(attention_policy=json.dumps(QUEST_POLICY)))
    responses = served.call(lambda stub, _: collect(stub.Generate(request)))
    assert [t for r in responses[:-1] for t in r.chunk.token_ids] == offline.sparse.outputs[0].token_ids


def test_token_ids_input_non_stream(served, offline):
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=offline.prompt_ids), sampling=greedy())  # model "": served
    responses = served.call(lambda stub, _: collect(stub.Generate(request)))
    assert [r.WhichOneof("response") for r in responses] == ["chunk", "complete"]
    want = offline.ids.outputs[0]
    assert list(responses[0].chunk.token_ids) == want.token_ids
    assert responses[0].chunk.text == want.text == offline.text.outputs[0].text
    assert responses[1].complete.prompt_tokens == len(offline.prompt_ids)
    assert responses[0].request_id.startswith("grpc-")


def test_n2_sampled_streams_both_choices(served):
    sampling = pb.SamplingParams(n=2, temperature=0.8, seed=7, max_tokens=8, ignore_eos=True)
    request = pb.GenerateRequest(model=MODEL_NAME, text=PROMPT, sampling=sampling, stream=True)
    responses = served.call(lambda stub, _: collect(stub.Generate(request)))
    for index in (0, 1):
        chunks = [r.chunk for r in responses if r.WhichOneof("response") == "chunk" and r.chunk.index == index]
        completes = [r.complete for r in responses if r.WhichOneof("response") == "complete"
                     and r.complete.index == index]
        assert len(completes) == 1 and completes[0].finish_reason == "length"
        assert sum(len(c.token_ids) for c in chunks) == completes[0].completion_tokens == 8


def test_logit_bias_forces_a_token(served, offline):
    forced = next(t for t in range(100, 200) if t not in offline.text.outputs[0].token_ids)
    sampling = greedy(max_tokens=3, ignore_eos=True, logit_bias={forced: 100.0})
    request = pb.GenerateRequest(text=PROMPT, sampling=sampling)
    responses = served.call(lambda stub, _: collect(stub.Generate(request)))
    assert list(responses[0].chunk.token_ids) == [forced] * 3


def test_cancelled_stream_aborts_request(served, async_engine):
    request = pb.GenerateRequest(text=PROMPT, sampling=greedy(max_tokens=200, ignore_eos=True), stream=True)

    async def cancel_after_three_chunks(stub, _):
        call = stub.Generate(request)
        for _ in range(3):
            await call.read()
        in_use = async_engine.engine.core.kv.num_free_blocks < async_engine.engine.num_kv_blocks
        call.cancel()
        steps_at_cancel = async_engine.engine.core.num_steps
        await asyncio.sleep(0.3)  # the server sees the cancellation
        return in_use, steps_at_cancel, await call.code()

    in_use, steps_at_cancel, code = served.call(cancel_after_three_chunks)
    assert in_use and code == grpc.StatusCode.CANCELLED
    assert kv_pool_is_full(async_engine)
    assert not async_engine.engine.has_unfinished()
    # Aborted, not run to its end: a lone request decodes one token per step, and ~195 were left.
    assert async_engine.engine.core.num_steps - steps_at_cancel < 100


# ---- errors -------------------------------------------------------------------------------------------------
BAD_REQUESTS = {
    "top_p=2": (dict(text=PROMPT, sampling=pb.SamplingParams(top_p=2.0)), "sampling.top_p"),
    "temperature=-1": (dict(text=PROMPT, sampling=pb.SamplingParams(temperature=-1.0)), "sampling.temperature"),
    "max_tokens=-1": (dict(text=PROMPT, sampling=pb.SamplingParams(max_tokens=-1)), "sampling.max_tokens"),
    "n=0": (dict(text=PROMPT, sampling=pb.SamplingParams(n=0)), "sampling.n"),
    "nan": (dict(text=PROMPT, sampling=pb.SamplingParams(top_p=float("nan"))), "sampling.top_p"),
    "temperature=inf": (dict(text=PROMPT, sampling=pb.SamplingParams(temperature=float("inf"))),
                        "sampling.temperature"),
    "n over HTTP's cap": (dict(text=PROMPT, sampling=pb.SamplingParams(n=100000)), "sampling.n"),
    "no input": (dict(), "input"),
    "empty text": (dict(text=""), "text"),
    "token id out of range": (dict(token_ids=pb.TokenIds(ids=[1, 10**9])), "token_ids"),
    "logit_bias=500": (dict(text=PROMPT, sampling=pb.SamplingParams(logit_bias={5: 500.0})), "sampling.logit_bias"),
    "logit_bias token out of range": (dict(text=PROMPT, sampling=pb.SamplingParams(logit_bias={10**9: 1.0})),
                                      "sampling.logit_bias"),
    "prompt over the context": (dict(token_ids=pb.TokenIds(ids=[1] * 300)), "token_ids"),
    "unknown attention policy": (dict(text=PROMPT, sampling=pb.SamplingParams(attention_policy='{"name": "x"}')),
                                 "sampling.attention_policy"),
    "text over the context": (dict(text="word " * 3000), "text"),
    # the same context check as HTTP's: prompt + max_tokens must fit
    "max_tokens over the context": (dict(text=PROMPT, sampling=pb.SamplingParams(max_tokens=1000)),
                                    "sampling.max_tokens"),
    "prompt + max_tokens over the context": (dict(token_ids=pb.TokenIds(ids=[1] * 200),
                                                  sampling=pb.SamplingParams(max_tokens=100)), "token_ids"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_request_is_invalid_argument(served, case):
    fields, param = BAD_REQUESTS[case]
    request = pb.GenerateRequest(model=MODEL_NAME, stream=True, **fields)
    responses, error = served.call(lambda stub, _: _responses_and_error(stub.Generate(request)))
    assert [r.WhichOneof("response") for r in responses] == ["error"]
    e = responses[0].error
    assert (e.code, e.http_status_code, e.param) == ("INVALID_ARGUMENT", 400, param), e
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details() == e.message


async def _responses_and_error(call):
    responses = []
    try:
        async for r in call:
            responses.append(r)
    except grpc.aio.AioRpcError as e:
        return responses, e
    raise AssertionError(f"the call succeeded: {responses}")


def test_unknown_model_is_not_found(served):
    async def both(stub, _):
        generate = await _responses_and_error(stub.Generate(pb.GenerateRequest(model="gpt-9", text=PROMPT)))
        with pytest.raises(grpc.aio.AioRpcError) as tokenize:
            await stub.Tokenize(pb.TokenizeRequest(model="gpt-9", text=PROMPT))
        return generate, tokenize.value

    (responses, error), tokenize_error = served.call(both)
    assert responses[0].error.http_status_code == 404 and responses[0].error.param == "model"
    assert error.code() == tokenize_error.code() == grpc.StatusCode.NOT_FOUND


def test_dead_engine_is_unavailable_and_not_serving():
    engine = SimpleNamespace(is_alive=True)
    s = Served(engine)
    try:
        async def check(channel, service=""):
            health = health_pb2_grpc.HealthStub(channel)
            return (await health.Check(health_pb2.HealthCheckRequest(service=service))).status

        assert s.call(lambda _, ch: check(ch)) == health_pb2.HealthCheckResponse.SERVING
        engine.is_alive = False
        for service in ("", "afdserve.v1.Generation"):
            assert s.call(lambda _, ch: check(ch, service)) == health_pb2.HealthCheckResponse.NOT_SERVING
        responses, error = s.call(lambda stub, _: _responses_and_error(stub.Generate(pb.GenerateRequest(text="x"))))
        assert responses[0].error.http_status_code == 503 and error.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        s.close()


def test_requests_are_counted_in_the_servers_metrics(served):
    """gRPC requests go through the HTTP server's request path: its metrics count them (finished, tokens)."""
    def finished():
        text = served.ctx.metrics.render().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("afdserve:request_success_total{"))

    before = finished()
    request = pb.GenerateRequest(model=MODEL_NAME, text=PROMPT, sampling=pb.SamplingParams(max_tokens=2, n=2))
    served.call(lambda stub, _: _responses(stub.Generate(request)))
    assert finished() == before + 2  # two sequences


async def _responses(call):
    return [r async for r in call]


def test_a_message_over_the_request_limit_is_resource_exhausted(async_engine):
    s = Served(async_engine, max_request_bytes=2000)
    try:
        request = pb.GenerateRequest(model=MODEL_NAME, text="x" * 4000)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            s.call(lambda stub, _: _responses(stub.Generate(request)))
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        small = pb.GenerateRequest(model=MODEL_NAME, text=PROMPT, sampling=pb.SamplingParams(max_tokens=1))
        assert s.call(lambda stub, _: _responses(stub.Generate(small)))[-1].WhichOneof("response") == "complete"
    finally:
        s.close()


# ---- Tokenize, ListModels, health, reflection ---------------------------------------------------------------
def test_tokenize_and_list_models(served, async_engine):
    async def both(stub, _):
        return (await stub.Tokenize(pb.TokenizeRequest(model=MODEL_NAME, text=PROMPT)),
                await stub.ListModels(pb.ListModelsRequest()))

    tokens, models = served.call(both)
    assert list(tokens.token_ids) == async_engine.tokenizer.encode(PROMPT) and tokens.count == len(tokens.token_ids)
    assert tokens.max_model_len == models.models[0].max_model_len == 256
    assert [m.id for m in models.models] == [MODEL_NAME]


def test_health_reports_serving(served):
    async def check(_, channel):
        health = health_pb2_grpc.HealthStub(channel)
        statuses = [(await health.Check(health_pb2.HealthCheckRequest(service=s))).status
                    for s in ("", "afdserve.v1.Generation")]
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        return statuses, unknown.value.code()

    statuses, unknown = served.call(check)
    assert statuses == [health_pb2.HealthCheckResponse.SERVING] * 2
    assert unknown == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_service(served):
    async def reflect(_, channel):
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol="afdserve.v1.Generation")]
        return [r async for r in stub.ServerReflectionInfo(iter(requests))]

    listed, found = served.call(reflect)
    names = {s.name for s in listed.list_services_response.service}
    assert {"afdserve.v1.Generation", "grpc.health.v1.Health"} <= names
    file = descriptor_pb2.FileDescriptorProto.FromString(found.file_descriptor_response.file_descriptor_proto[0])
    assert file.name == "afdserve/v1/generation.proto" and file.package == "afdserve.v1"
    assert [m.name for m in file.service[0].method] == ["Generate", "Tokenize", "ListModels"]


# ---- generated code -----------------------------------------------------------------------------------------
def test_regenerating_the_proto_code_changes_nothing(tmp_path):
    pytest.importorskip("grpc_tools")
    subprocess.run(["bash", str(REPO / "scripts/gen_proto.sh"), str(tmp_path)], check=True,
                   env={**os.environ, "PYTHON": sys.executable})
    committed = REPO / "engine/server/proto/afdserve/v1"
    for name in ("generation_pb2.py", "generation_pb2.pyi", "generation_pb2_grpc.py"):
        assert (tmp_path / "afdserve/v1" / name).read_bytes() == (committed / name).read_bytes(), name
