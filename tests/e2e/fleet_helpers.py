"""A fleet as the tests run it: ``python -m treadle.deploy up SPEC`` as a real process in its own
session, its status read from the status file, and the async load the acceptance tests send
through the router (whole answers and streams, each remembering which worker served it)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import httpx

from tests.e2e.serve_helpers import free_port
from treadle.deploy.proc_tree import alive, descendants

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
API_KEY = "fleet-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
WORDS = ("river stone cloud maple engine violet harbor quartz lantern meadow falcon copper ember willow "
         "garnet tundra orchid canyon beacon thistle glacier saffron pebble comet cedar marble").split()


def unrelated(n: int, seed: int) -> list[str]:
    """``n`` prompts of random words: no two share much of a prefix."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(10)) + f" #{i}" for i in range(n)]


def write_spec(path: str, workers: str, extra: str = "") -> int:
    """A fleet spec at ``path`` with fast probes; ``workers``: its ``[[workers]]`` tables. The
    router's port."""
    port = free_port()
    with open(path, "w") as f:
        f.write(f"""name = "test"
state_dir = "state"
api_key = "{API_KEY}"
{extra}
[engine]
model_path = "default"
log_level = "warning"
[router]
port = {port}
[supervisor]
health_interval_s = 1.0
health_timeout_s = 5.0
unhealthy_after = 3
deep_health_interval_s = 15.0
backoff_initial_s = 0.5
crash_loop_limit = 3
drain_timeout_s = 30.0
{workers}""")
    return port


class Fleet:
    """The supervisor process of a spec, and what its status file says."""

    def __init__(self, spec_path: str, router_port: int) -> None:
        self.spec_path = spec_path
        self.url = f"http://127.0.0.1:{router_port}"
        self.status_path = os.path.join(os.path.dirname(spec_path), "state", "status.json")
        self.log = open(os.path.join(os.path.dirname(spec_path), "supervisor.log"), "w")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen([sys.executable, "-m", "treadle.deploy", "up", spec_path], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=ROOT)

    def status(self) -> dict[str, Any]:
        try:
            with open(self.status_path) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError):
            return {"workers": []}

    def worker(self, name: str) -> dict[str, Any]:
        return next((w for w in self.status()["workers"] if w["name"] == name), {})

    def wait_for(self, what: str, check: Callable[[], bool], timeout_s: float) -> float:
        """Seconds until ``check()`` holds; fails the test with the supervisor's log after ``timeout_s``."""
        start = time.monotonic()
        while not check():
            if time.monotonic() - start > timeout_s:
                raise AssertionError(f"{what}: not within {timeout_s:g} s; status {self.status()}\n{self.output()}")
            if self.proc.poll() is not None:
                raise AssertionError(f"{what}: the supervisor exited ({self.proc.returncode})\n{self.output()}")
            time.sleep(0.25)
        return time.monotonic() - start

    def output(self) -> str:
        with open(self.log.name) as f:
            return f.read()[-4000:]

    def tree(self) -> list[int]:
        return [self.proc.pid] + descendants(self.proc.pid)

    def kill(self) -> None:
        """Cleanup after a failed test: the supervisor and everything under it."""
        pids = self.tree()
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)
        self.log.close()


@contextmanager
def running_fleet(spec_path: str, router_port: int, what: str, ready: Callable[[Fleet], bool],
                  timeout_s: float) -> Iterator[Fleet]:
    """A supervisor started on ``spec_path``, handed over once ``ready(fleet)`` holds; whatever a
    test left running is killed afterwards."""
    f = Fleet(spec_path, router_port)
    try:
        f.wait_for(what, lambda: ready(f), timeout_s)
        yield f
    finally:
        if f.proc.poll() is None:
            f.kill()


def no_process_left(pids: list[int], timeout_s: float = 15.0) -> list[int]:
    """The ones of ``pids`` still alive after ``timeout_s`` (empty: all gone)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if alive(p)]


@dataclass
class Outcome:
    """One request through the router: its worker, status, events (streams) or body."""

    worker: str = ""
    status: int = 0
    body: Any = None
    events: list[Any] = field(default_factory=list)
    done: bool = False      # a stream that ended with [DONE]
    first_event: Optional[float] = None

    @property
    def error(self) -> Optional[dict]:
        return next((e["error"] for e in self.events if isinstance(e, dict) and "error" in e), None)


async def send(client: httpx.AsyncClient, text: str, max_new_tokens: int, stream: bool = False,
               out: Optional[Outcome] = None) -> Outcome:
    """One request; ``out`` (filled as it goes) lets the caller watch a stream while it runs."""
    body = {"text": text, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0,
                                              "ignore_eos": True}, "stream": stream}
    out = out if out is not None else Outcome()
    if not stream:
        r = await client.post("/generate", json=body)
        out.worker, out.status = r.headers.get("x-treadle-worker", ""), r.status_code
        out.body = r.json()
        return out
    async with client.stream("POST", "/generate", json=body) as r:
        out.worker, out.status = r.headers.get("x-treadle-worker", ""), r.status_code
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                out.done = True
                continue
            out.events.append(json.loads(line[6:]))
            if out.first_event is None:
                out.first_event = time.monotonic()
    return out


def client_for(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, headers=AUTH, timeout=300,
                             limits=httpx.Limits(max_connections=300, max_keepalive_connections=300))


def run_load(url: str, texts: list[str], max_new_tokens: int) -> list[Outcome]:
    """``texts`` as concurrent whole-answer requests."""
    async def go() -> list[Outcome]:
        async with client_for(url) as c:
            return list(await asyncio.gather(*(send(c, t, max_new_tokens) for t in texts)))
    return asyncio.run(go())
