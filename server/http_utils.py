"""What every route shares: fast JSON bodies, server-sent events, and aborting the request of a
client that went away.

A client that disconnects must not leave its request running (its KV pages would stay taken):
a stream's generator is closed by Starlette when the send fails, and closing the engine's stream
aborts what it left running; a whole-result call is raced against ``request.is_disconnected()``
and cancelled, which aborts it the same way (``client/calls.py``).
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Optional, TypeVar

import msgspec
from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from treadle.server.errors import APIError, body_of

if TYPE_CHECKING:
    from treadle.server.metrics import RequestTimer

T = TypeVar("T")
_encoder = msgspec.json.Encoder()
DISCONNECT_POLL_S = 0.25


def json_response(obj: Any, status_code: int = 200) -> Response:
    """msgspec's encoder: several times faster than ``json.dumps`` on large logprob lists."""
    return Response(content=_encoder.encode(obj), status_code=status_code, media_type="application/json")


async def read_json(request: Request) -> dict[str, Any]:
    """The body as a JSON object, or a 400 saying what is wrong with it."""
    raw = await request.body()
    try:
        body = json.loads(raw) if raw else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"The request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, f"The request body must be a JSON object, not {type(body).__name__}.")
    return body


def sse_event(obj: Any) -> bytes:
    return b"data: " + _encoder.encode(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def sse_response(events: AsyncIterator[bytes], on_close: Optional[Callable[[], None]] = None) -> StreamingResponse:
    """Stream already-formatted SSE events. An exception inside the stream (the status line has
    gone out by then) is sent as one last ``data: {"error": ...}`` event, then ``[DONE]``."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for event in events:
                yield event
        except Exception as exc:  # noqa: BLE001 - reported to the client in the stream itself
            yield sse_event(body_of(exc))
            yield SSE_DONE
        finally:
            if on_close is not None:
                on_close()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def unless_disconnected(request: Request, call: Awaitable[T]) -> Optional[T]:
    """Await ``call``; if the client disconnects first, cancel it (which aborts its requests) and
    return None (there is nobody to answer)."""
    task = asyncio.ensure_future(call)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):  # noqa: BLE001 - nobody left to tell
                    pass
                return None
    finally:
        if not task.done():
            task.cancel()


async def timed_engine_call(request: Request, timer: "RequestTimer", call: Awaitable[T],
                            map_error: Optional[Callable[[Exception], Exception]] = None) -> Optional[T]:
    """The answer of an engine call (a result, or a stream's iterator) for one route, timed: None,
    and an "abort" on the timer, when the client went away first (which aborted the request); an
    exception marks the timer "error" and goes on, the engine's ValueError/TypeError through
    ``map_error`` (which renames a field to the client's spelling). A success is the caller's to
    record: it knows the token counts."""
    try:
        out = await unless_disconnected(request, call)
    except (ValueError, TypeError) as e:
        timer.done("error")
        if map_error is None:
            raise
        raise map_error(e) from None
    except BaseException:
        timer.done("error")
        raise
    if out is None:
        timer.done("abort")
    return out

