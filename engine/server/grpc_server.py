"""gRPC front end: afdserve.v1.Generation, the standard grpc.health.v1.Health service and server reflection, on
one grpc.aio server that shares the HTTP server's ServingContext (engine, checks, metrics, in-flight set) and event
loop; prompts are tokenized on a worker thread, as HTTP's are.

    client ──Generate──► GenerationServicer ──generate_tracked()──► AsyncEngine (engine thread)
                               │ ◄──── cumulative RequestOutputs ─────┘
                               └──► chunk … chunk (new tokens + safe text, per choice), complete (per choice)

Errors. A Generate call that fails sends one `error` response (message, HTTP-like status, offending field) and then
ends with the matching gRPC status, so that stream readers see the reason and proxies, meshes and retry policies see
the code:

    bad input (sampling values, empty prompt, prompt + max_tokens over the context,
               token id out of range: the checks HTTP makes, in serving_common)     INVALID_ARGUMENT   400
    a model name other than the served one (empty: the served one)                    NOT_FOUND          404
    the engine loop has died                                                         UNAVAILABLE        503
    anything else                                                                    INTERNAL           500
    a message over --max-request-bytes (refused by grpc itself, no error response)   RESOURCE_EXHAUSTED

Tokenize and ListModels end with the status alone. A call that the client cancels (or whose deadline passes)
cancels its handler; closing the engine stream then aborts the request and frees its KV blocks.

Health reports SERVING for "" and "afdserve.v1.Generation" until the engine loop dies, NOT_SERVING after.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from afdserve.engine.async_engine import AsyncEngine, EngineDeadError, RequestFailedError
from afdserve.engine.outputs import CompletionOutput, RequestOutput
from afdserve.engine.sampling_params import SamplingParams
from afdserve.engine.server.errors import APIError
from afdserve.engine.server.protocol import MAX_N
from afdserve.engine.server.serving_common import ServingContext, generate_tracked
from afdserve.engine.server.proto.afdserve.v1 import generation_pb2 as pb
from afdserve.engine.server.proto.afdserve.v1 import generation_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

GENERATION_SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
_SAMPLING_FIELDS = frozenset(f.name for f in pb.SamplingParams.DESCRIPTOR.fields)
_HTTP_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404,
                grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.INTERNAL: 500}
_HEALTH_POLL_S = 0.5


class RequestError(Exception):
    """A call's failure: the gRPC status it ends with, a message, and the request field at fault ("" if none)."""

    def __init__(self, status: grpc.StatusCode, message: str, param: str = ""):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def to_proto(self) -> pb.Error:
        return pb.Error(message=self.message, http_status_code=_HTTP_STATUS[self.status], code=self.status.name,
                        param=self.param)


# ---- request → engine ---------------------------------------------------------------------------------------
def sampling_params(msg: pb.SamplingParams) -> SamplingParams:
    """The set fields of `msg` over SamplingParams' defaults; INVALID_ARGUMENT naming the field if one is bad."""
    kwargs = {f.name: v if isinstance(v, (bool, int, float, str)) else dict(v) if f.message_type else list(v)
              for f, v in msg.ListFields()}  # a map field (logit_bias) is a repeated message field
    if kwargs.get("n", 1) > MAX_N:  # HTTP's cap too: n sequences are queued at once
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"n must be at most {MAX_N}, got {kwargs['n']}",
                           "sampling.n")
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        raise _invalid(e, input_field="") from None


async def prompt_ids_of(ctx: ServingContext, request: pb.GenerateRequest) -> list[int]:
    """The prompt's token ids, tokenized off the event loop as HTTP's are, and checked as HTTP checks them."""
    which = request.WhichOneof("input")
    if which is None:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "input is required: set text or token_ids", "input")
    if which == "text":
        return await ctx.encode(request.text, "text")
    ids = list(request.token_ids.ids)
    ctx.check_token_ids(ids, "token_ids")
    return ids


def _from_api_error(error: APIError, input_field: str) -> RequestError:
    """The shared checks' HTTP-shaped error as this API's: the gRPC status, and the field under its proto name."""
    status = {404: grpc.StatusCode.NOT_FOUND, 503: grpc.StatusCode.UNAVAILABLE}.get(
        error.status, grpc.StatusCode.INVALID_ARGUMENT if error.status < 500 else grpc.StatusCode.INTERNAL)
    param = error.param or ""
    if param in _SAMPLING_FIELDS:
        param = f"sampling.{param}"
    elif param in ("prompt", "text", "token_ids"):
        param = input_field
    return RequestError(status, error.message, param)


def _invalid(error: ValueError, input_field: str) -> RequestError:
    """INVALID_ARGUMENT for a ValueError whose message starts with the field it is about (the engine's habit)."""
    message = str(error)
    first = message.split(" ", 1)[0]
    if first in _SAMPLING_FIELDS:
        param = f"sampling.{first}"
    elif first == "prompt":
        param = input_field
    elif message.startswith("request id"):
        param = "request_id"
    else:
        param = ""
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message, param)


# ---- engine → responses -------------------------------------------------------------------------------------
def _chunk(index: int, token_ids: list[int], text: str) -> pb.GenerateResponse:
    return pb.GenerateResponse(chunk=pb.Chunk(index=index, token_ids=token_ids, text=text))


def _complete(out: RequestOutput, choice: CompletionOutput) -> pb.GenerateResponse:
    return pb.GenerateResponse(complete=pb.Complete(
        index=choice.index, finish_reason=choice.finish_reason, prompt_tokens=len(out.prompt_token_ids),
        completion_tokens=len(choice.token_ids)))


async def streamed(outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[pb.GenerateResponse]:
    """Per choice: a chunk whenever it has new tokens or new safe text, then its complete once it finishes."""
    num_sent: dict[int, int] = {}
    done: set[int] = set()
    async for out in outputs:
        for choice in out.outputs:
            if choice.index in done:
                continue
            new_ids = choice.token_ids[num_sent.get(choice.index, 0):]
            if new_ids or choice.text_delta:
                num_sent[choice.index] = len(choice.token_ids)
                yield _chunk(choice.index, new_ids, choice.text_delta)
            if choice.finished:
                done.add(choice.index)
                yield _complete(out, choice)


async def whole(outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[pb.GenerateResponse]:
    """Per choice, once all have finished: one chunk with all its tokens and text, then its complete."""
    final = None
    async for final in outputs:
        pass
    for choice in final.outputs:
        yield _chunk(choice.index, choice.token_ids, choice.text)
        yield _complete(final, choice)


# ---- services -----------------------------------------------------------------------------------------------
class GenerationServicer(pb_grpc.GenerationServicer):
    """Shares the HTTP server's ServingContext: the same prompt checks, tokenization off the event loop, request
    metrics, and the in-flight set a drain aborts."""

    def __init__(self, ctx: ServingContext):
        self.ctx = ctx
        self.engine = ctx.engine
        self.model_name = ctx.model_name

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        request_id = request.request_id or f"grpc-{uuid.uuid4().hex}"
        input_field = request.WhichOneof("input") or ""
        try:
            self._check(request.model)
            params = sampling_params(request.sampling)
            prompt_ids = await prompt_ids_of(self.ctx, request)
            self.ctx.check_context_length(len(prompt_ids), params.max_tokens, input_field, "sampling.max_tokens")
            self.ctx.check_params(params)
            async with contextlib.aclosing(generate_tracked(self.ctx, prompt_ids, params, request_id)) as outputs:
                async for response in (streamed if request.stream else whole)(outputs):
                    response.request_id = request_id
                    yield response
            return
        except RequestError as e:
            error = e
        except APIError as e:
            error = _from_api_error(e, input_field)
        except (EngineDeadError, RequestFailedError) as e:
            error = RequestError(grpc.StatusCode.UNAVAILABLE, str(e))
        except ValueError as e:  # the engine rejected the input
            error = _invalid(e, input_field=input_field)
        except Exception as e:
            logger.exception("gRPC Generate %s failed", request_id)
            error = RequestError(grpc.StatusCode.INTERNAL, f"internal error: {e!r}")
        yield pb.GenerateResponse(request_id=request_id, error=error.to_proto())
        await context.abort(error.status, error.message)

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        try:
            self._check(request.model)
        except RequestError as e:
            await context.abort(e.status, e.message)
        add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
        try:
            ids = await self.ctx.tokenize(request.text, "text", add_special)
        except APIError as e:
            error = _from_api_error(e, "text")
            await context.abort(error.status, error.message)
        return pb.TokenizeResponse(token_ids=ids, count=len(ids), max_model_len=self.engine.max_model_len)

    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        model = pb.Model(id=self.model_name, root=str(self.engine.config.model.model),
                         max_model_len=self.engine.max_model_len)
        return pb.ListModelsResponse(models=[model])

    def _check(self, model: str) -> None:
        if not self.engine.is_alive:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "the engine loop is not running")
        if model and model != self.model_name:
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"model {model!r} does not exist; this server serves {self.model_name!r}", "model")


class EngineHealthServicer(HealthServicer):
    """grpc.health.v1.Health that turns NOT_SERVING for good once the engine loop has died: checked on every Check
    and Watch, and polled while the server runs so that watchers hear of it."""

    SERVICES = ("", GENERATION_SERVICE)

    def __init__(self, engine: AsyncEngine):
        super().__init__()
        self.engine = engine
        self._dead = False
        self._poller: asyncio.Task | None = None

    async def start(self, server: grpc.aio.Server) -> None:
        for service in self.SERVICES:
            await self.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._poller = asyncio.create_task(self._poll(server))

    async def Check(self, request, context):
        await self._sync()
        return await super().Check(request, context)

    async def Watch(self, request, context):
        await self._sync()
        await super().Watch(request, context)

    async def _sync(self) -> None:
        if self._dead or self.engine.is_alive:
            return
        self._dead = True
        for service in self.SERVICES:
            await self.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _poll(self, server: grpc.aio.Server) -> None:
        # wait_for_termination(timeout) answers True when it timed out (the server still runs), False once stopped.
        while not self._dead and await server.wait_for_termination(_HEALTH_POLL_S):
            await self._sync()


async def start_grpc_server(ctx: ServingContext, host: str, port: int) -> grpc.aio.Server:
    """Starts Generation, Health and reflection on host:port and returns the running server; the caller stops it
    (`await server.stop(grace)`). Raises RuntimeError if the port cannot be bound."""
    server = grpc.aio.server(options=[
        ("grpc.so_reuseport", 0),  # a port in use is an error, not a shared port
        ("grpc.max_receive_message_length", ctx.max_request_bytes),  # larger: RESOURCE_EXHAUSTED
    ])
    pb_grpc.add_GenerationServicer_to_server(GenerationServicer(ctx), server)
    health = EngineHealthServicer(ctx.engine)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection((GENERATION_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    server.add_insecure_port(address)  # raises RuntimeError if the address cannot be bound
    await server.start()
    await health.start(server)
    logger.info("gRPC server (%s) listening on %s", GENERATION_SERVICE, address)
    return server
