"""Errors in the OpenAI shape, `{"error": {"message", "type", "param", "code"}}`, for every failure the API reports.

Handlers raise APIError; the exception handlers installed by `install_error_handlers` turn it, FastAPI's request
validation errors (400, never FastAPI's default 422) and Starlette's HTTP errors (404 route, 405 method, ...)
into that shape, so a client never sees a second error format.
"""
from __future__ import annotations

import http
import json
import re
from collections.abc import Iterable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from afdserve.engine.async_engine import EngineDeadError, RequestAbortedError, RequestFailedError
from afdserve.engine.server.protocol import ErrorInfo, ErrorResponse

# vLLM's (and the openai client's) names for the error classes the API returns.
_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                500: "InternalServerError", 503: "ServiceUnavailableError"}


class APIError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param

    def body(self) -> ErrorResponse:
        kind = _ERROR_TYPES.get(self.status) or _reason_phrase(self.status)
        return ErrorResponse(error=ErrorInfo(message=self.message, type=kind, param=self.param, code=self.status))

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status)

    def sse_event(self) -> str:
        """The error as an SSE event, for errors that happen after a stream has started (status already 200)."""
        return f"data: {json.dumps(self.body().model_dump())}\n\n"


def _reason_phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase.replace(" ", "")
    except ValueError:
        return "Error"


def model_not_found(name: str) -> APIError:
    return APIError(f"The model `{name}` does not exist.", 404, param="model")


def engine_dead() -> APIError:
    return APIError("the engine loop is not running; the server must be restarted", 503)


def from_validation_errors(errors: list[dict], fields: Iterable[str] = ()) -> APIError:
    """One 400 from pydantic's error list: each error as "field.path: message", param = the top-level field, or for
    an error of the whole body (a model validator) the field its message starts with, if it is one of `fields`."""
    lines, param = [], None
    for err in errors:
        loc = [str(part) for part in err.get("loc", ()) if part != "body"]
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        lines.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
        if param is None and loc:
            param = loc[0]
        elif param is None and msg.split(" ", 1)[0] in fields:
            param = msg.split(" ", 1)[0]
    unique = list(dict.fromkeys(lines))
    return APIError("; ".join(unique[:5]) or "invalid request", 400, param)


def from_value_error(error: ValueError) -> APIError:
    """A 400 from an engine-side ValueError; its message starts with the field's name (SamplingParams' rule)."""
    message = str(error)
    first = message.split(" ", 1)[0]
    return APIError(message, 400, first if re.fullmatch(r"[a-z_]+", first) else None)


def from_exception(error: BaseException) -> APIError:
    if isinstance(error, APIError):
        return error
    if isinstance(error, EngineDeadError):
        return engine_dead()
    if isinstance(error, RequestFailedError):  # the engine recovered; a retry will be served
        return APIError(f"the request failed and may be retried: {error}", 503)
    if isinstance(error, RequestAbortedError):  # only a drain that ran out of time aborts a live request
        return APIError("the server is shutting down; the request was aborted", 503)
    if isinstance(error, ValidationError):
        return from_validation_errors(error.errors(include_url=False))
    if isinstance(error, ValueError):
        return from_value_error(error)
    return APIError(f"internal error: {type(error).__name__}: {error}", 500)


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    async def on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return from_validation_errors(list(exc.errors())).response()

    async def on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(str(exc.detail), exc.status_code).response()

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
