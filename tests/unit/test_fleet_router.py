"""The router against fake workers (httpx.MockTransport): retry before the first byte, the error
event of a stream cut midway, 503 with no worker, the API key, broadcasts and session pins."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Callable

import httpx

from treadle.deploy.pool import Pool
from treadle.deploy.router import Router, create_router_app
from treadle.deploy.spec import RouterSpec


class CutStream(httpx.AsyncByteStream):
    """A worker's SSE body that fails after its first event (the worker died)."""

    async def __aiter__(self):
        yield b'data: {"text": "a"}\n\n'
        raise httpx.RemoteProtocolError("peer closed connection")


def run(handler: Callable[[httpx.Request], Any], call: Callable, api_key: str | None = None,
        up: tuple[str, ...] = ("a", "b")) -> Any:
    pool = Pool(RouterSpec(), ["a", "b"])
    for name in up:
        pool.set_up(name, f"http://{name}.test", fresh=True)
    router = Router(pool, api_key, transport=httpx.MockTransport(handler))

    async def go() -> Any:
        transport = httpx.ASGITransport(app=create_router_app(router))
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            return await call(client), router

    return asyncio.run(go())


def test_connection_failure_is_retried_on_the_other_worker():
    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.host == "a.test":
            raise httpx.ConnectError("refused")
        return httpx.Response(200, json={"text": "ok", "auth": req.headers.get("authorization")})

    async def call(c: httpx.AsyncClient) -> list[httpx.Response]:
        return [await c.post("/generate", json={"text": f"p{i}"}, headers={"Authorization": "Bearer k"})
                for i in range(3)]

    out, router = run(handler, call, api_key="k")
    assert all(r.status_code == 200 and r.headers["x-treadle-worker"] == "b" for r in out)
    assert out[0].json()["auth"] == "Bearer k"  # the key goes on to the workers
    assert not router.pool.members["a"].healthy  # out of rotation after the failure
    assert all(m.inflight == 0 for m in router.pool.members.values())
    assert b"treadle_router:retries_total" in router.metrics.render(router.pool)


def test_503s_the_api_key_and_no_worker():
    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json={"error": {"message": "overloaded"}}, headers={"Retry-After": "1"})

    async def call(c: httpx.AsyncClient) -> list[httpx.Response]:
        return [await c.post("/generate", json={"text": "x"}, headers={"Authorization": "Bearer k"}),
                await c.post("/generate", json={"text": "x"}),
                await c.get("/health")]

    (busy, no_key, health), _ = run(handler, call, api_key="k")
    # both workers refused: the last one's own answer goes back, its Retry-After with it
    assert busy.status_code == 503 and busy.json()["error"]["message"] == "overloaded"
    assert busy.headers["retry-after"] == "1"
    assert no_key.status_code == 401
    assert health.status_code == 200
    (busy, no_key, health), _ = run(handler, call, api_key="k", up=())
    assert health.status_code == 503 and busy.status_code == 503
    assert busy.json()["error"]["code"] == "no_healthy_worker"


def test_stream_cut_midway_ends_with_an_error_event():
    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=CutStream())

    async def call(c: httpx.AsyncClient) -> str:
        r = await c.post("/generate", json={"text": "x", "stream": True})
        return r.text

    text, router = run(handler, call)
    events = [e for e in text.split("\n\n") if e]
    assert events[0] == 'data: {"text": "a"}'
    assert json.loads(events[1][len("data: "):])["error"]["code"] == "worker_failed"
    assert events[-1] == "data: [DONE]"
    assert sum(m.inflight for m in router.pool.members.values()) == 0


def test_sessions_pin_and_broadcast():
    seen: list[tuple[str, str]] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append((req.url.host, req.url.path))
        if req.url.path == "/open_session":
            return httpx.Response(200, json="sess-1")
        return httpx.Response(200, json={"ok": True})

    async def call(c: httpx.AsyncClient) -> list[httpx.Response]:
        out = [await c.post("/open_session", json={"capacity_of_str_len": 100})]
        out += [await c.post("/generate", json={"text": f"turn {i} " + "z" * i, "session_params": {"id": "sess-1"}})
                for i in range(4)]
        out.append(await c.post("/flush_cache"))
        out.append(await c.post("/close_session", json={"session_id": "sess-1"}))
        return out

    out, router = run(handler, call)
    owner = out[0].headers["x-treadle-worker"]
    assert {r.headers["x-treadle-worker"] for r in out[1:5]} == {owner}
    assert sorted(h for h, p in seen if p == "/flush_cache") == ["a.test", "b.test"]
    assert [h for h, p in seen if p == "/close_session"] == [f"{owner}.test"] and "sess-1" not in router.pool.sessions
