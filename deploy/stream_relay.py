"""A worker's stream passed through the router event by event, and what happens when it ends:
the worker's response closed, the request counted done (also when the client left before the
first event, when the body's generator never starts), and a worker that failed midway reported
with an error event and ``[DONE]`` after the events already sent."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, AsyncIterator

import httpx
from starlette.responses import StreamingResponse

from treadle.server.errors import error_body
from treadle.server.http_utils import SSE_DONE, sse_event

if TYPE_CHECKING:
    from treadle.deploy.pool import Member
    from treadle.deploy.router import Router


async def sse_events(resp: httpx.Response) -> AsyncIterator[bytes]:
    """A worker's SSE body as whole events (``data: ...\\n\\n``), so that an error event never
    lands inside a half-sent one."""
    buf = b""
    async for chunk in resp.aiter_raw():
        buf += chunk
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            yield event + b"\n\n"
    if buf:
        yield buf


class StreamRelay:
    """One stream passed through: its events, then (once, however it ends) the bookkeeping."""

    def __init__(self, router: "Router", m: "Member", resp: httpx.Response, start: float) -> None:
        self.router, self.m, self.resp, self.start = router, m, resp, start
        self.status, self.finished = resp.status_code, False

    async def events(self, first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        router, m = self.router, self.m
        try:
            if first:
                yield first
            async for event in rest:
                m.last_progress = time.monotonic()
                yield event
        except httpx.TransportError as e:
            router.pool.report_failure(m.name)
            router.metrics.stream_errors.labels(m.name).inc()
            self.status = 502
            yield sse_event(error_body(502, f"The worker {m.name} failed during this stream "
                                       f"({type(e).__name__}); the output above is incomplete.", code="worker_failed"))
            yield SSE_DONE
        finally:
            await self.finish()

    async def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        await self.resp.aclose()
        self.router.pool.done(self.m)
        self.router._count(self.m, self.status, self.start)


class RelayResponse(StreamingResponse):
    """A stream that closes its worker's response and counts itself done even when the client
    left before the first event was sent (then the body's generator never starts)."""

    def __init__(self, relay: StreamRelay, content: AsyncIterator[bytes], *args: Any, **kwargs: Any) -> None:
        super().__init__(content, *args, **kwargs)
        self.relay = relay

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.relay.finish()
