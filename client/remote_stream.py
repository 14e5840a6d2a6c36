"""The streams ``RemoteEngine.generate(stream=True)`` returns: iterators over a server-sent-event
response, sync and async, that yield the same chunk dicts as the in-process engine's streams.

They are classes rather than generators so that closing one before its first chunk still closes
the HTTP response: the server sees the client go away and aborts the request (its KV is freed),
as closing an in-process stream early aborts what it left running.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Iterator

import httpx

from treadle.client.remote_wire import _DONE, connection_error, sse_line
from treadle.runtime.errors import EngineDeadError


def _transport_error(url: str, exc: httpx.TransportError) -> BaseException:
    if isinstance(exc, httpx.ReadTimeout):
        return TimeoutError(f"No data from {url} within the RemoteEngine's timeout: {exc}")
    return connection_error(url, exc)


def _ended_early(url: str) -> EngineDeadError:
    return EngineDeadError(f"The stream from {url} ended before it finished (the server went away).")


class RemoteStream(Iterator[dict]):
    """Chunks of one streamed ``/generate`` response; ``close()`` (or the end) closes the response."""

    def __init__(self, response: httpx.Response, url: str) -> None:
        self._resp = response
        self._url = url
        self._lines = response.iter_lines()
        self._open = True

    def __iter__(self) -> "RemoteStream":
        return self

    def __next__(self) -> dict[str, Any]:
        if not self._open:
            raise StopIteration
        try:
            for line in self._lines:
                chunk = sse_line(line, self._url)
                if chunk is _DONE:
                    break
                if chunk is not None:
                    return chunk
            else:
                raise _ended_early(self._url)
        except httpx.TransportError as e:
            self.close()
            raise _transport_error(self._url, e) from None
        except BaseException:
            self.close()
            raise
        self.close()
        raise StopIteration

    def close(self) -> None:
        if self._open:
            self._open = False
            self._resp.close()

    def __enter__(self) -> "RemoteStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class AsyncRemoteStream(AsyncIterator[dict]):
    """The async twin of ``RemoteStream``; ``aclose()`` closes the response. The reading is an
    async generator underneath, so a stream dropped half-read (``async for ...: break``) is closed
    by the event loop's async-generator finalizer, as an in-process stream is."""

    def __init__(self, response: httpx.Response, url: str) -> None:
        self._resp = response
        self._url = url
        self._chunks = self._read()

    def __aiter__(self) -> "AsyncRemoteStream":
        return self

    async def __anext__(self) -> dict[str, Any]:
        return await self._chunks.__anext__()

    async def _read(self) -> AsyncIterator[dict[str, Any]]:
        try:
            async for line in self._resp.aiter_lines():
                chunk = sse_line(line, self._url)
                if chunk is _DONE:
                    return
                if chunk is not None:
                    yield chunk
            raise _ended_early(self._url)
        except httpx.TransportError as e:
            raise _transport_error(self._url, e) from None
        finally:
            await self._resp.aclose()

    async def aclose(self) -> None:
        await self._chunks.aclose()  # a generator never started skips its finally: close the response too
        await self._resp.aclose()
