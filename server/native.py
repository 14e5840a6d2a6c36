"""SGLang's native routes that run requests: ``/health``, ``/generate``, ``/encode``. The control
routes (server info, cache, sessions, LoRA, profiling, metrics) are in ``native_control.py``."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Awaitable

from fastapi import APIRouter, Request, Response

from treadle.server import native_control
from treadle.server.errors import APIError, error_response
from treadle.server.http_utils import SSE_DONE, json_response, read_json, sse_event, sse_response, timed_engine_call
from treadle.server.metrics import RequestTimer, outcome_of
from treadle.server.native_control import check_serving, unknown_field

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> Response:
    """200 while the engine runs; 503 once it died or the server is draining (SIGTERM)."""
    state = request.app.state
    if state.engine_dead is not None:
        return error_response(503, f"The engine is not running: {state.engine_dead}", code="engine_dead")
    if state.draining:
        return error_response(503, "The server is shutting down.", code="draining")
    return Response(status_code=200)


# SGLang's HTTP field names that differ from the Engine's keyword arguments
_HTTP_NAMES = {"text": "prompt"}


def _engine_kwargs(body: dict[str, Any]) -> dict[str, Any]:
    """``/generate``'s JSON is ``Engine.generate``'s keyword arguments (``text`` is ``prompt``);
    unknown fields reach the engine, which names them in its ``ValueError``."""
    kwargs = {_HTTP_NAMES.get(k, k): v for k, v in body.items()}
    if "text" in body and "prompt" in body:
        raise APIError(400, "Give the prompt as either 'text' or 'prompt', not both.", "text")
    return kwargs


async def call_engine(call: Awaitable[Any]) -> Any:
    """Await an engine call; an unknown JSON field becomes a 400 that names it."""
    try:
        return await call
    except (TypeError, ValueError) as e:
        err = unknown_field(e)
        if err is None:
            raise
        raise err from None


def _metas(out: Any) -> list[dict[str, Any]]:
    """The ``meta_info`` of each item of a result (an object, or a list for a batch)."""
    return [r.get("meta_info") or {} for r in (out if isinstance(out, list) else [out])]


@router.post("/generate")
async def generate(request: Request) -> Response:
    """SGLang's ``/generate``: the body is ``Engine.generate``'s arguments as JSON; the answer is
    its result (an object, or a list for a batch), or with ``"stream": true`` its chunks as
    server-sent events ending in ``data: [DONE]``."""
    state = request.app.state
    kwargs = _engine_kwargs(await read_json(request))
    check_serving(state)
    timer = state.metrics.timer()
    out = await timed_engine_call(request, timer, call_engine(state.engine.async_generate(**kwargs)))
    if out is None:  # the client went away: its request was aborted
        return Response(status_code=499)
    if kwargs.get("stream"):
        return sse_response(_stream_events(out, timer))
    timer.whole_result(_metas(out))
    return json_response(out)


async def _stream_events(chunks: AsyncIterator[dict[str, Any]], timer: RequestTimer) -> AsyncIterator[bytes]:
    """Each chunk as an SSE event, timing tokens as they come. Closing this generator (the client
    disconnected) closes the engine's stream, which aborts the request."""
    totals: dict[Any, dict[str, Any]] = {}  # per batch index: the last meta_info
    outcome = "error"
    try:
        async for chunk in chunks:
            meta = chunk.get("meta_info") or {}
            before = (totals.get(chunk.get("index")) or {}).get("completion_tokens", 0)
            totals[chunk.get("index")] = meta
            timer.tokens(int(meta.get("completion_tokens", 0) or 0) - before)
            yield sse_event(chunk)
        outcome = outcome_of(list(totals.values()))
        yield SSE_DONE
    except (asyncio.CancelledError, GeneratorExit):
        outcome = "abort"
        raise
    finally:
        await chunks.aclose()
        timer.done_with(outcome, list(totals.values()))


@router.post("/encode")
async def encode(request: Request) -> Response:
    """SGLang's ``/encode``: ``Engine.encode``'s arguments as JSON (``text`` is ``prompt``)."""
    state = request.app.state
    kwargs = _engine_kwargs(await read_json(request))
    check_serving(state)
    if "prompt" not in kwargs and "input_ids" in kwargs:
        kwargs["prompt"] = kwargs.pop("input_ids")
    if "prompt" not in kwargs:
        raise APIError(400, "'text' (or 'input_ids') is required.", "text")
    timer = state.metrics.timer()
    out = await timed_engine_call(request, timer, call_engine(state.engine.async_encode(**kwargs)))
    if out is None:
        return Response(status_code=499)
    timer.done("success", sum(int(m.get("prompt_tokens", 0) or 0) for m in _metas(out)))
    return json_response(out)


# the control routes answer under the same router (create_app includes this one)
router.include_router(native_control.router)
