"""The HTTP connection of a ``RemoteEngine``: one sync httpx client, one async client per event
loop (an httpx ``AsyncClient`` belongs to the loop it first ran on), requests and their answers
turned into the engine's results or exceptions (``remote_wire.py`` holds that mapping)."""

from __future__ import annotations

import asyncio
import threading
import weakref
from typing import Any, Optional

import httpx

from treadle.client.remote_args import encode_body
from treadle.client.remote_wire import connection_error, decode_json, error_of
from treadle.runtime.errors import EngineDeadError

CONNECT_TIMEOUT_S = 30.0


class HttpConnection:
    def __init__(self, url: str, api_key: Optional[str], timeout: Optional[float], transport: Any = None) -> None:
        self.url, self.api_key = url, api_key
        self._timeout = httpx.Timeout(timeout, connect=min(timeout or CONNECT_TIMEOUT_S, CONNECT_TIMEOUT_S))
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._transport = transport  # the unit tests' httpx.MockTransport
        self._client: Optional[httpx.Client] = None
        self._async: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient]" = \
            weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._closed = False

    def call(self, method: str, path: str, body: Optional[dict[str, Any]] = None, ok: tuple[int, ...] = (200,),
             outcome: Optional[str] = None) -> Any:
        return self.answer(self.send(method, path, body), ok, outcome)

    async def acall(self, method: str, path: str, body: Optional[dict[str, Any]] = None) -> Any:
        return self.answer(await self.asend(method, path, body))

    def answer(self, resp: httpx.Response, ok: tuple[int, ...] = (200,), outcome: Optional[str] = None) -> Any:
        """The decoded JSON of an answer whose status is in ``ok`` (a result-shaped answer, one with
        the ``outcome`` key, when that is given); any other answer raises its exception."""
        if resp.status_code in ok:
            out = decode_json(resp.content) if resp.content else None
            if outcome is None or (isinstance(out, dict) and outcome in out):
                return out
        raise error_of(resp.status_code, resp.content, self.url, bool(self.api_key))

    def send(self, method: str, path: str, body: Optional[dict[str, Any]] = None,
             stream: bool = False) -> httpx.Response:
        client = self._sync_client()
        content = None if body is None else encode_body(body)
        try:
            req = client.build_request(method, self.url + path, content=content)
            resp = client.send(req, stream=stream)
        except httpx.TransportError as e:
            raise self._transport_error(e) from None
        if stream and resp.status_code != 200:
            try:
                resp.read()
            finally:
                resp.close()
            self.answer(resp)
        return resp

    async def asend(self, method: str, path: str, body: Optional[dict[str, Any]] = None,
                    stream: bool = False) -> httpx.Response:
        client = self._async_client()
        content = None if body is None else encode_body(body)
        try:
            req = client.build_request(method, self.url + path, content=content)
            resp = await client.send(req, stream=stream)
        except httpx.TransportError as e:
            raise self._transport_error(e) from None
        if stream and resp.status_code != 200:
            try:
                await resp.aread()
            finally:
                await resp.aclose()
            self.answer(resp)
        return resp

    def _transport_error(self, exc: httpx.TransportError) -> BaseException:
        if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
            return TimeoutError(f"{self.url} did not answer within the RemoteEngine's timeout: {exc}")
        return connection_error(self.url, exc)

    def _sync_client(self) -> httpx.Client:
        with self._lock:
            self._check_open()
            if self._client is None:
                self._client = httpx.Client(headers=self._headers, timeout=self._timeout,
                                            transport=self._transport)
            return self._client

    def _async_client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        with self._lock:
            self._check_open()
            client = self._async.get(loop)
            if client is None:
                client = self._async[loop] = httpx.AsyncClient(
                    headers=self._headers, timeout=self._timeout, transport=self._transport)
            return client

    def _check_open(self) -> None:
        if self._closed:
            raise EngineDeadError(f"This RemoteEngine ({self.url}) has been shut down.")

    def close(self) -> None:
        """Close every client (idempotent); an async client closes on its own loop, if that still runs."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            client, self._client = self._client, None
            clients, self._async = list(self._async.items()), weakref.WeakKeyDictionary()
        if client is not None:
            client.close()
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        for loop, aclient in clients:
            if loop.is_closed() or not loop.is_running():
                continue
            if loop is current:
                loop.create_task(aclient.aclose())
            else:
                asyncio.run_coroutine_threadsafe(aclient.aclose(), loop)
