"""The fleet's HTTP front: the routes of ``treadle serve``, each passed to a worker the pool picks.

- Generating routes (``/generate``, ``/v1/completions``, ``/v1/chat/completions``, ``/encode``,
  ``/v1/embeddings``, ``/v1/rerank``, ``/v1/score``) go to one worker, picked by the policy
  (``pool.py``) from the request's text and session. The answer names it in ``X-Treadle-Worker``.
- Retry: a request whose worker failed before the first byte went back to the client (connection
  refused or reset, a 502/503/504, a whole answer cut short, a stream cut before its first event)
  is sent once more to another worker. Whole answers are read in full before any byte goes out,
  so for them every failure is "before the first byte"; a stream goes out event by event once its
  first event came, and a worker failing after that ends it with an error event and ``[DONE]``.
- Control routes that change a worker (``/flush_cache``, LoRA, weights, profiling, aborts) go to
  every healthy worker; read-only ones (``/v1/models``, ``/get_model_info``, ...) to any one.
- Sessions: ``/open_session`` pins the new id to the worker that opened it, later turns follow it.
- ``/health`` is 200 while a worker is healthy; ``/metrics`` is the router's own.
- The API key is checked as ``treadle serve`` checks it, and sent on to the workers.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Optional

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from treadle.deploy.pool import Member, Pool
from treadle.deploy.route_keys import routing_text, session_of
from treadle.deploy.router_metrics import RouterMetrics
from treadle.deploy.stream_relay import RelayResponse, StreamRelay, sse_events
from treadle.server.errors import error_response

ROUTED = ("/generate", "/encode", "/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/rerank",
          "/v1/score")
ANY_ONE = ("/v1/models", "/get_model_info", "/get_server_info", "/health_generate")
BROADCAST = ("/flush_cache", "/freeze_gc", "/abort_request", "/start_profile", "/stop_profile",
             "/load_lora_adapter", "/unload_lora_adapter", "/update_weights_from_disk")
RETRY_STATUS = (502, 503, 504)
OPEN_PATHS = frozenset({"/health"})
CONNECT_TIMEOUT_S = 5.0
KEEPALIVE_S = 2.0


class Router:
    """The app's state: the pool, the HTTP client to the workers, the metrics, the drain flag."""

    def __init__(self, pool: Pool, api_key: Optional[str] = None, transport: Any = None) -> None:
        self.pool, self.api_key = pool, api_key
        self.metrics = RouterMetrics()
        self.draining = False
        # idle connections expire before uvicorn's (5 s) close them, so a request rarely meets one
        # the worker is closing at that moment (that one would be retried)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256, keepalive_expiry=KEEPALIVE_S)
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT_S), limits=limits,
                                        transport=transport)
        self.headers = {"content-type": "application/json"}
        if api_key:
            self.headers["authorization"] = f"Bearer {api_key}"

    @property
    def inflight(self) -> int:
        return sum(m.inflight for m in self.pool.members.values())

    # -------------------------------------------------------------- one worker
    async def forward(self, request: Request, path: str) -> Response:
        """A routed request: picked, sent, retried once before its first byte."""
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None  # the worker answers the 400
        text = routing_text(path, body)
        session = session_of(body, request.headers.get("x-session-id"))
        start, tried, why = time.perf_counter(), [], "no healthy worker"
        refused: Optional[Response] = None  # a worker's own 502/503/504, answered if no other takes it
        for attempt in range(2 if self.pool.spec.retry else 1):
            member = self.pool.pick(text, session, exclude=tried)
            if member is None:
                break
            if attempt:
                self.metrics.retries.labels(tried[-1]).inc()
            self.metrics.decisions.labels(self.pool.last_reason).inc()
            tried.append(member.name)
            out = await self._try(member, request.method, path, raw, start)
            if isinstance(out, Response) and out.status_code not in RETRY_STATUS:
                return out
            self.pool.done(member)
            if isinstance(out, Response):
                refused, why = out, f"{member.name} answered {out.status_code}"
            else:
                why = out
        if refused is not None:
            return refused
        self.metrics.no_worker.inc()
        return error_response(503, f"No healthy worker could take the request ({why}).", code="no_healthy_worker")

    async def _try(self, m: Member, method: str, path: str, raw: bytes, start: float) -> Response | str:
        """The worker's answer as a Response (a 502/503/504 one not yet counted: it may be retried),
        or why it failed before the first byte (a str)."""
        try:
            resp = await self.client.send(self.client.build_request(method, f"{m.url}{path}", content=raw,
                                                                    headers=self.headers), stream=True)
        except httpx.TransportError as e:
            if isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout)):  # nobody listens: out of rotation
                self.pool.report_failure(m.name)
            return f"{m.name}: {type(e).__name__}: {e}"
        headers = {"x-treadle-worker": m.name}
        if resp.status_code in RETRY_STATUS:  # the caller retries it elsewhere, or answers it as is
            try:
                content = await resp.aread()
            except httpx.TransportError:
                content = b""
            finally:
                await resp.aclose()
            return Response(content, resp.status_code, headers={**headers, **_kept(resp.headers)},
                            media_type=resp.headers.get("content-type"))
        if not resp.headers.get("content-type", "").startswith("text/event-stream"):
            try:
                content = await resp.aread()
            except httpx.TransportError as e:
                self.pool.report_failure(m.name)
                return f"{m.name} failed mid-answer: {type(e).__name__}"
            finally:
                await resp.aclose()
            self.pool.done(m)
            self._count(m, resp.status_code, start)
            return Response(content, resp.status_code, headers=headers, media_type=resp.headers.get("content-type"))
        events = sse_events(resp)
        try:
            first = await events.__anext__()
        except StopAsyncIteration:
            first = b""
        except httpx.TransportError as e:
            await resp.aclose()
            self.pool.report_failure(m.name)
            return f"{m.name} failed before its first event: {type(e).__name__}"
        headers.update({"cache-control": "no-cache", "x-accel-buffering": "no"})
        relay = StreamRelay(self, m, resp, start)
        return RelayResponse(relay, relay.events(first, events), resp.status_code, headers=headers,
                             media_type="text/event-stream")

    def _count(self, m: Member, status: int, start: float) -> None:
        self.metrics.requests.labels(m.name, f"{status // 100}xx").inc()
        self.metrics.latency.observe(time.perf_counter() - start)

    # -------------------------------------------------------------- several workers
    async def broadcast(self, request: Request, path: str) -> Response:
        """Every healthy worker: the first error if any, else the first answer."""
        raw = await request.body()
        members = self.pool.healthy()
        if not members:
            return self._no_worker()
        answers = await asyncio.gather(*(self._send(m, request.method, path, raw) for m in members))
        return next((a for a in answers if a.status_code >= 400), answers[0])

    async def any_one(self, request: Request, path: str) -> Response:
        members = sorted(self.pool.healthy(), key=lambda m: m.inflight)
        if not members:
            return self._no_worker()
        return await self._send(members[0], request.method, path, await request.body())

    async def _send(self, m: Member, method: str, path: str, raw: bytes) -> Response:
        try:
            r = await self.client.request(method, f"{m.url}{path}", content=raw, headers=self.headers)
        except httpx.TransportError as e:
            self.pool.report_failure(m.name)
            return error_response(502, f"The worker {m.name} did not answer: {type(e).__name__}.",
                                  code="worker_failed", headers={"x-treadle-worker": m.name})
        return Response(r.content, r.status_code, headers={"x-treadle-worker": m.name},
                        media_type=r.headers.get("content-type"))

    def _no_worker(self) -> Response:
        self.metrics.no_worker.inc()
        return error_response(503, "No healthy worker.", code="no_healthy_worker")

    # -------------------------------------------------------------- sessions
    async def open_session(self, request: Request) -> Response:
        """The least busy worker opens it (an id already pinned goes to its worker, which refuses
        it as ``treadle serve`` does); the id is pinned to that worker."""
        raw = await request.body()
        try:
            sid = json.loads(raw).get("session_id")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            sid = None
        member = self.pool.pick("", session=sid if isinstance(sid, str) and sid in self.pool.sessions else None)
        if member is None:
            return self._no_worker()
        try:
            resp = await self._send(member, "POST", "/open_session", raw)
        finally:
            self.pool.done(member)
        if resp.status_code == 200:
            self.pool.pin(json.loads(resp.body), member.name)
        return resp

    async def close_session(self, request: Request) -> Response:
        raw = await request.body()
        try:
            sid = json.loads(raw).get("session_id")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            sid = None
        name = self.pool.unpin(sid) if isinstance(sid, str) else None
        member = self.pool.members.get(name) if name else None
        if member is None or not member.healthy:  # not opened here: whoever has it closes it
            return await self.broadcast(request, "/close_session")
        return await self._send(member, "POST", "/close_session", raw)


def _kept(headers: httpx.Headers) -> dict[str, str]:
    """A worker's headers worth passing on (an overloaded worker's ``Retry-After``)."""
    return {k: v for k, v in headers.items() if k.lower() == "retry-after"}


def create_router_app(router: Router) -> Any:
    """The Starlette app around a ``Router``."""

    async def health(request: Request) -> Response:
        if router.draining:
            return error_response(503, "The fleet is shutting down.", code="draining")
        if not router.pool.healthy():
            return error_response(503, "No healthy worker.", code="no_healthy_worker")
        return Response(status_code=200)

    async def metrics(request: Request) -> Response:
        return Response(router.metrics.render(router.pool), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def workers(request: Request) -> Response:
        return Response(json.dumps([m.__dict__ for m in router.pool.members.values()]), media_type="application/json")

    def route(path: str, call: Any, methods: list[str]) -> Route:
        async def endpoint(request: Request) -> Response:
            if router.draining:
                return error_response(503, "The fleet is shutting down.", code="draining")
            return await call(request, path)
        return Route(path, endpoint, methods=methods)

    async def open_session(request: Request) -> Response:
        return await router.open_session(request)

    async def close_session(request: Request) -> Response:
        return await router.close_session(request)

    routes = [Route("/health", health), Route("/metrics", metrics), Route("/fleet/workers", workers),
              Route("/open_session", open_session, methods=["POST"]),
              Route("/close_session", close_session, methods=["POST"])]
    routes += [route(p, router.forward, ["POST"]) for p in ROUTED]
    routes += [route(p, router.any_one, ["GET"]) for p in ANY_ONE]
    routes += [route(p, router.broadcast, ["GET", "POST"]) for p in BROADCAST]
    app = Starlette(routes=routes)
    return RequireKey(app, router.api_key) if router.api_key else app


class RequireKey:
    """ASGI wrapper: ``Authorization: Bearer KEY`` on every route but ``/health``, as ``treadle
    serve`` asks it (a plain ASGI layer: streams pass through it untouched)."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS \
                and dict(scope["headers"]).get(b"authorization") != self.expected:
            response = error_response(401, "Invalid or missing API key (send 'Authorization: Bearer <key>').",
                                      code="invalid_api_key")
            return await response(scope, receive, send)
        await self.app(scope, receive, send)
