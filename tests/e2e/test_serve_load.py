"""200 concurrent streaming clients, one in five closing its stream after the first chunk: every
other request completes, and afterwards the engine is idle with no KV pages held by a request
(a disconnected client's request was aborted and its pages freed)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest

from tests.e2e.serve_helpers import serve_in_thread

CLIENTS = 200
MAX_NEW_TOKENS = 8


async def one_client(client: httpx.AsyncClient, i: int, leave_early: bool) -> dict[str, Any]:
    body = {"text": f"Request {i}: the numbers after {i} are", "stream": True,
            "sampling_params": {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 0.0, "ignore_eos": True}}
    last, done, chunks = None, False, 0
    async with client.stream("POST", "/generate", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            last, chunks = json.loads(line[6:]), chunks + 1
            assert "error" not in last, last
            if leave_early:
                break  # leaving the block closes the connection mid-stream
    return {"left": leave_early, "done": done, "last": last, "chunks": chunks}


async def run_all(url: str) -> list[dict[str, Any]]:
    limits = httpx.Limits(max_connections=CLIENTS + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=240, limits=limits) as client:
        return await asyncio.gather(*(one_client(client, i, i % 5 == 0) for i in range(CLIENTS)))


def server_state(engine: Any) -> dict[str, Any]:
    return engine.get_server_info()["internal_states"][0]


def test_200_streaming_clients_with_one_in_five_disconnecting(engine: Any) -> None:
    with serve_in_thread(engine, "default") as url:
        t0 = time.monotonic()
        results = asyncio.run(run_all(url))
        elapsed = time.monotonic() - t0
        stayed = [r for r in results if not r["left"]]
        left = [r for r in results if r["left"]]
        assert len(stayed) == 160 and len(left) == 40
        for r in stayed:
            assert r["done"], r
            meta = r["last"]["meta_info"]
            assert meta["finish_reason"]["type"] == "length" and meta["completion_tokens"] == MAX_NEW_TOKENS, meta
        assert all(r["chunks"] == 1 for r in left)
        # the aborts of the 40 that left reach the scheduler within moments
        deadline = time.monotonic() + 30
        state = server_state(engine)
        while (state["num_running"] or state["num_waiting"]) and time.monotonic() < deadline:
            time.sleep(0.2)
            state = server_state(engine)
        assert state["num_running"] == 0 and state["num_waiting"] == 0, state
        checked = engine._check_integrity()  # asserts in the scheduler that no page or slot leaked
        assert checked["locked_pages"] == 0, checked
        assert checked["free_pages"] + checked["evictable_pages"] == checked["num_pages"], checked
        metrics = httpx.get(url + "/metrics", timeout=30).text
        success = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                      if line.startswith('treadle:num_requests_total{model_name="default",outcome="success"}'))
        aborted = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                      if line.startswith('treadle:num_requests_total{model_name="default",outcome="abort"}'))
        assert success >= 160 and success + aborted == CLIENTS, (success, aborted)
        print(f"{CLIENTS} clients in {elapsed:.1f} s; {aborted:.0f} aborted by disconnect")


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q", "-s"]))
