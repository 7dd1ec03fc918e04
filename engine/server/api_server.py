"""The OpenAI-compatible HTTP server: the FastAPI app (`build_app`) and the process around it (`run_server`).

    POST /v1/completions, /v1/chat/completions   JSON, or SSE when "stream": true
    GET  /v1/models                              vLLM's ModelCard list (with max_model_len)
    POST /tokenize, /detokenize                  vLLM's shapes
    GET  /health                                 200, or 503 once the engine loop has died
    GET  /version, /metrics                      Prometheus text format (see metrics.py)

With --api-key, every /v1/* request needs `Authorization: Bearer <key>` (401 otherwise); the other paths stay
open, as in vLLM. A client that hangs up aborts its engine requests: a stream is cancelled by Starlette when the
disconnect arrives, and a non-streaming request races its generation against the disconnect (`_respond`).

SIGTERM (or Ctrl+C) drains (DrainingServer): the listening sockets close at once, requests in flight run to the end
for up to --drain-timeout seconds and are then aborted (a stream ends with an error event and [DONE]), the gRPC
server stops alongside, the engine thread stops, and the process exits 0.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import signal
import threading
from collections.abc import Awaitable
from typing import TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError

import afdserve
from afdserve.engine.async_engine import AsyncEngine
from afdserve.engine.server.errors import (APIError, engine_dead, from_exception, from_validation_errors,
                                           install_error_handlers)
from afdserve.engine.server.metrics import ServerMetrics
from afdserve.engine.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ModelCard,
                                             ModelList, TokenizeRequest)
from afdserve.engine.server.serving_chat import ChatServing
from afdserve.engine.server.server_args import DEFAULT_MAX_REQUEST_BYTES
from afdserve.engine.server.serving_common import ServingContext
from afdserve.engine.server.serving_completions import CompletionServing
from afdserve.engine.server.serving_tokenization import TokenizationServing

logger = logging.getLogger("afdserve.server")
Body = TypeVar("Body", bound=BaseModel)


def build_app(engine: AsyncEngine, served_model_name: str, api_key: str | None = None,
              model_root: str | None = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> FastAPI:
    ctx = ServingContext(engine, served_model_name, ServerMetrics(served_model_name, engine.stats, engine.stage_times),
                         max_request_bytes)
    completions, chat, tokenization = CompletionServing(ctx), ChatServing(ctx), TokenizationServing(ctx)
    app = FastAPI(title="afdserve", version=afdserve.__version__)
    app.state.serving = ctx
    install_error_handlers(app)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)

    @app.post("/v1/completions")
    async def create_completion(raw_request: Request) -> Response:
        request = await read_body(raw_request, CompletionRequest)
        return await _respond(raw_request, completions.create(request))

    @app.post("/v1/chat/completions")
    async def create_chat_completion(raw_request: Request) -> Response:
        request = await read_body(raw_request, ChatCompletionRequest)
        return await _respond(raw_request, chat.create(request))

    @app.get("/v1/models")
    async def list_models() -> Response:
        card = ModelCard(id=served_model_name, root=model_root, max_model_len=engine.max_model_len)
        return _json(ModelList(data=[card]))

    @app.post("/tokenize")
    async def tokenize(raw_request: Request) -> Response:
        request = await read_body(raw_request, TokenizeRequest)
        try:
            return _json(await tokenization.tokenize(request))
        except ValueError as e:
            raise from_exception(e) from None

    @app.post("/detokenize")
    async def detokenize(raw_request: Request) -> Response:
        request = await read_body(raw_request, DetokenizeRequest)
        return _json(_bad_input_as_400(tokenization.detokenize, request))

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200) if engine.is_alive else engine_dead().response()

    @app.get("/version")
    async def server_version() -> dict:
        return {"version": afdserve.__version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


# ---- request plumbing -----------------------------------------------------------------------------------------
async def read_body(raw_request: Request, model: type[Body]) -> Body:
    """The JSON body as `model`. Parsed here rather than by FastAPI so that every failure (bad UTF-8, bad JSON,
    any Content-Type, wrong shape) is the same OpenAI-shaped 400; a body over the server's limit is a 413."""
    raw = await _read_limited(raw_request, raw_request.app.state.serving.max_request_bytes)
    try:
        data = json.loads(raw)
    except UnicodeDecodeError:
        raise APIError("the request body is not valid UTF-8", 400) from None
    except RecursionError:  # json.loads recurses once per nesting level
        raise APIError("the request body nests too deeply", 400) from None
    except ValueError as e:
        raise APIError(f"the request body is not valid JSON: {e}", 400) from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise from_validation_errors(e.errors(include_url=False), model.model_fields) from None


async def _read_limited(raw_request: Request, limit: int) -> bytes:
    """The body, refused as soon as it is known to exceed `limit` bytes: from Content-Length before reading, or
    while a chunked body streams in."""
    def too_large(size: str) -> APIError:
        return APIError(f"the request body is {size} bytes, over this server's limit of {limit} "
                        f"(--max-request-bytes)", 413)

    declared = raw_request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(declared)
    body = bytearray()
    async for chunk in raw_request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large(f"more than {len(body)}")
    return bytes(body)


def _bad_input_as_400(handler, request):
    """A handler's ValueError (input the engine refused, e.g. invalid Unicode) in the API's error shape."""
    try:
        return handler(request)
    except ValueError as e:
        raise from_exception(e) from None


def _json(body: BaseModel) -> Response:
    return Response(body.model_dump_json(), media_type="application/json")


async def _respond(raw_request: Request, work: Awaitable) -> Response:
    """Runs a handler's work (validation, and for a non-streaming request the whole generation) racing the
    client's disconnect, so a client that hangs up does not leave its requests computing for nobody."""
    try:
        result = await _unless_disconnected(raw_request, work)
    except Exception as e:  # an engine-side error (bad input it caught, dead engine, drain abort) in the API shape
        error = from_exception(e)
        if error.status >= 500:
            logger.error("request failed: %r", e, exc_info=error.status == 500)
        raise error from e
    if result is None:
        return Response(status_code=499)  # client closed the request; nobody reads this
    if isinstance(result, BaseModel):
        return _json(result)
    return StreamingResponse(result, media_type="text/event-stream")


async def _unless_disconnected(raw_request: Request, work: Awaitable):
    work_task = asyncio.ensure_future(work)
    disconnect_task = asyncio.ensure_future(_wait_for_disconnect(raw_request))
    try:
        done, _ = await asyncio.wait({work_task, disconnect_task}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server itself gave up on us (drain timeout)
        work_task.cancel()
        disconnect_task.cancel()
        raise
    if work_task in done:
        disconnect_task.cancel()
        return work_task.result()
    work_task.cancel()  # closes the engine streams, which aborts the requests and frees their KV blocks
    await asyncio.gather(work_task, return_exceptions=True)
    return None


async def _wait_for_disconnect(raw_request: Request) -> None:
    # The body is already read, so the next ASGI message is the disconnect (event-driven, no polling).
    while (await raw_request.receive())["type"] != "http.disconnect":
        pass


class APIKeyMiddleware:
    """401 for /v1/* requests without `Authorization: Bearer <key>`. A plain ASGI middleware, so it answers
    before the body is read and leaves streaming responses alone."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        protected = path == "/v1" or path.startswith("/v1/")
        if scope["type"] == "http" and protected and not self._authorized(scope):
            response = APIError("invalid or missing API key (send Authorization: Bearer <key>)", 401).response()
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope) -> bool:
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        return secrets.compare_digest(given, self.expected)


# ---- the process ----------------------------------------------------------------------------------------------
class DrainingServer(uvicorn.Server):
    """uvicorn's server, draining our way on SIGTERM/SIGINT:

        t=0        listening sockets close (uvicorn), gRPC stops taking calls; requests in flight go on
        t=drain    whatever is still generating is aborted: a stream gets an error event and [DONE], a
                   waiting non-streaming client a 503, and the KV blocks are freed
        t=drain+5  uvicorn's own timeout cancels any handler still running (a backstop)

    A caught SIGTERM is not re-raised after the shutdown (uvicorn re-raises it, which would end a clean drain
    with status 143 instead of 0)."""

    BACKSTOP_S = 5.0

    def __init__(self, config: uvicorn.Config, ctx: ServingContext, drain_timeout: float, grpc_server=None):
        super().__init__(config)
        self.ctx = ctx
        self.drain_timeout = drain_timeout
        self.grpc_server = grpc_server

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    async def shutdown(self, sockets=None) -> None:
        deadline = asyncio.get_running_loop().call_later(self.drain_timeout, self._abort_inflight)
        stops = [super().shutdown(sockets)]
        if self.grpc_server is not None:
            stops.append(self.grpc_server.stop(self.drain_timeout))
        try:
            await asyncio.gather(*stops)
        finally:
            deadline.cancel()

    def _abort_inflight(self) -> None:
        count = self.ctx.abort_inflight()
        if count:
            logger.warning("drain timeout (%.1f s): aborted %d request(s) still in flight", self.drain_timeout, count)


async def _start_grpc(ctx: ServingContext, host: str, port: int):
    if not port:
        return None
    try:
        from afdserve.engine.server.grpc_server import start_grpc_server
    except ImportError as e:
        logger.warning("gRPC is not available (%s); serving HTTP only", e)
        return None
    server = await start_grpc_server(ctx, host, port)
    logger.info("gRPC listening on %s:%d", host, port)
    return server


async def _serve(engine: AsyncEngine, app: FastAPI, args) -> None:
    ctx: ServingContext = app.state.serving
    grpc_server = await _start_grpc(ctx, args.host, args.grpc_port)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            access_log=args.access_log,
                            timeout_graceful_shutdown=args.drain_timeout + DrainingServer.BACKSTOP_S)
    try:
        await DrainingServer(config, ctx, args.drain_timeout, grpc_server).serve()
    finally:
        if grpc_server is not None:
            await grpc_server.stop(None)  # already stopped after a drain; here for a failed start


def run_server(args) -> int:
    """`afdserve serve`: builds the engine from the engine flags, serves until SIGTERM/SIGINT, drains, exits 0."""
    from afdserve.engine.arg_utils import engine_config_from_args

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = AsyncEngine(engine_config_from_args(args))
    name = args.served_model_name or args.model
    app = build_app(engine, name, args.api_key, model_root=str(engine.engine.model_dir),
                    max_request_bytes=args.max_request_bytes)
    logger.info("serving %s (max_model_len %d) on http://%s:%d", name, engine.max_model_len, args.host, args.port)
    try:
        asyncio.run(_serve(engine, app, args))
    finally:
        engine.shutdown()
    return 0
