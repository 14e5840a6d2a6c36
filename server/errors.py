"""HTTP errors in OpenAI's JSON shape, and the one mapping from the engine's exceptions to them.

Every route raises or lets through the engine's own exceptions; the handlers installed here turn
them into ``{"error": {"message", "type", "param", "code"}}`` with a status code, so a bad request
is a 400 naming its field and the server keeps serving. SGLang's native routes answer with the
same shape (its own server does too, for errors).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from treadle.runtime.errors import EngineDeadError, EngineOverloadedError

log = logging.getLogger("treadle.server")

# seconds a client is told to wait before retrying an overloaded engine (OpenAI's clients honour it)
RETRY_AFTER_S = 1

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 408: "timeout_error", 413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 500: "internal_server_error", 501: "not_implemented_error",
          503: "service_unavailable"}


class APIError(Exception):
    """An error a route decides itself (an unknown model, a missing field): status, message and
    the parameter at fault."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> dict[str, Any]:
    """OpenAI's error object. ``code`` defaults to the status code, as SGLang's server sends it."""
    return {"error": {"message": message, "type": _TYPES.get(status, "error"), "param": param,
                      "code": code if code is not None else status}}


def error_response(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                   headers: Optional[dict[str, str]] = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def status_of(exc: BaseException) -> int:
    """The HTTP status for an exception the engine raised (also used for errors inside a stream,
    where the status line has already gone out and the error travels as an SSE event)."""
    if isinstance(exc, APIError):
        return exc.status
    if isinstance(exc, EngineOverloadedError):
        return 503
    if isinstance(exc, EngineDeadError):
        return 503
    if isinstance(exc, (ValueError, TypeError)):
        return 400
    if isinstance(exc, NotImplementedError):
        return 501
    if isinstance(exc, TimeoutError):
        return 504
    return 500


def body_of(exc: BaseException) -> dict[str, Any]:
    """The error object for an exception, the status included as its ``code``."""
    if isinstance(exc, APIError):
        return error_body(exc.status, exc.message, exc.param, exc.code)
    return error_body(status_of(exc), str(exc) or type(exc).__name__, _param_named_in(exc))


def _param_named_in(exc: BaseException) -> Optional[str]:
    """The engine's ValueErrors start with the field they are about (``"max_new_tokens must be
    ..."``); that word is OpenAI's ``param`` when it looks like a field name."""
    if not isinstance(exc, (ValueError, TypeError)):
        return None
    first = str(exc).split(" ", 1)[0].strip(":,.'\"`")
    return first if first.replace("_", "").replace(".", "").replace("[", "").replace("]", "").isalnum() \
        and ("_" in first or first.islower()) and len(first) < 64 else None


def install_error_handlers(app: FastAPI) -> None:
    """Every exception a route lets through becomes OpenAI's error shape. An engine that died
    also tells the app (``app.state.on_engine_dead``), which makes ``/health`` answer 503 and the
    server exit non-zero so that a supervisor restarts it."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg', 'invalid value')}" if param else str(first.get("msg", "invalid request"))
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(EngineOverloadedError)
    async def _overloaded(request: Request, exc: EngineOverloadedError) -> JSONResponse:
        return error_response(503, str(exc) or "The engine is overloaded.", code="overloaded",
                              headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(EngineDeadError)
    async def _dead(request: Request, exc: EngineDeadError) -> JSONResponse:
        on_dead = getattr(request.app.state, "on_engine_dead", None)
        if on_dead is not None:
            on_dead(exc)
        return error_response(503, str(exc) or "The engine is not running.", code="engine_dead")

    @app.exception_handler(ValueError)
    async def _value(request: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse(body_of(exc), status_code=400)

    @app.exception_handler(TypeError)
    async def _type(request: Request, exc: TypeError) -> JSONResponse:
        return JSONResponse(body_of(exc), status_code=400)

    @app.exception_handler(NotImplementedError)
    async def _not_implemented(request: Request, exc: NotImplementedError) -> JSONResponse:
        return JSONResponse(body_of(exc), status_code=501)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error serving %s %s", request.method, request.url.path)
        # Starlette re-raises the exception after this answer and uvicorn then drops the connection:
        # "close" tells a keep-alive client (httpx, RemoteEngine) not to send its next request on it
        return error_response(500, f"{type(exc).__name__}: {exc}", headers={"Connection": "close"})
