"""The supervisor: keeps each worker of a fleet running, and the router in front of them.

One asyncio loop holds everything: a task per worker (start, wait for ``/health``, probe, restart),
the router (uvicorn, in the same loop, sharing the ``Pool``), and a task writing the status file
that ``treadle fleet status`` reads. A worker that exits, or fails ``unhealthy_after`` probes in a
row (``/health``, and ``/health_generate`` at a lower rate: a frozen engine still accepts
connections), leaves the router's rotation at the first failed probe and is killed (its whole
process tree) and started again after a delay that doubles with each crash in a row. A worker
that crashed ``crash_loop_limit`` times in a row without staying up ``stable_after_s`` stays
down, its last error in the status.

SIGTERM or SIGINT (``treadle fleet down`` sends SIGTERM): the router answers 503 to new requests,
the requests in flight get ``drain_timeout_s`` to finish, then each worker is stopped (SIGTERM:
``treadle serve`` drains too; SIGKILL after the same grace) and the supervisor exits 0.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

import httpx
import uvicorn

from treadle.deploy.pool import Pool
from treadle.deploy.router import Router, create_router_app
from treadle.deploy.spec import FleetSpec, WorkerSpec
from treadle.deploy.status import StatusWriter, parse_loads

READY_LINE = "Fleet {name}: router on http://{host}:{port}"
TICK_S = 0.2


class Handle(Protocol):
    """What the supervisor needs of a worker, whatever runs it (a local process, a Ray actor)."""

    pid: Optional[int]

    async def start(self) -> str: ...
    def exit_code(self) -> Optional[int]: ...
    async def stop(self, grace_s: float) -> None: ...
    async def kill(self) -> None: ...
    def error_tail(self) -> str: ...


@dataclass
class WorkerState:
    spec: WorkerSpec
    handle: Any
    state: str = "pending"   # starting, healthy, unhealthy, restarting, failed, stopping, stopped
    url: Optional[str] = None
    restarts: int = 0
    crashes: int = 0         # in a row
    error: str = ""
    running: Optional[int] = None
    waiting: Optional[int] = None
    since: float = field(default_factory=time.time)

    def set(self, state: str) -> None:
        self.state, self.since = state, time.time()


class Supervisor:
    def __init__(self, spec: FleetSpec, handles: dict[str, Any]) -> None:
        self.spec, self.sup = spec, spec.supervisor
        self.workers = {w.name: WorkerState(w, handles[w.name]) for w in spec.workers}
        self.pool = Pool(spec.router, self.workers)
        self.router = Router(self.pool, spec.api_key)
        self.stop_requested = False
        self.force = False
        self.stopping = False
        self.phase = "starting"
        headers = {"authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
        self.probe = httpx.AsyncClient(headers=headers, timeout=self.sup.health_timeout_s)
        self.status = StatusWriter(spec, self)

    # -------------------------------------------------------------- one worker's life
    async def run_worker(self, w: WorkerState) -> None:
        while not self.stopping:
            w.set("starting")
            w.running = w.waiting = None
            try:
                w.url = await w.handle.start()
                reason = await self._wait_ready(w)
            except Exception as e:  # noqa: BLE001 - a start that raised is a crash like any other
                reason = f"start failed: {type(e).__name__}: {e}"
            started, ever_healthy = time.monotonic(), reason is None
            if reason is None:
                w.set("healthy")
                print(f"[fleet] {w.spec.name}: healthy at {w.url} (pid {w.handle.pid})", flush=True)
                self.pool.set_up(w.spec.name, w.url, fresh=True)
                reason = await self._watch(w)
                self.pool.set_down(w.spec.name)
            if self.stopping:
                return
            if time.monotonic() - started >= self.sup.stable_after_s:
                w.crashes = 0
            w.crashes += 1
            tail = "" if ever_healthy else w.handle.error_tail()  # why a start failed, from its log
            w.error = reason + (f" | {tail}" if tail and tail not in reason else "")
            await w.handle.kill()
            if w.crashes >= self.sup.crash_loop_limit:
                w.set("failed")
                w.error = f"crash loop: {w.crashes} crashes in a row, staying down; last: {w.error}"
                print(f"[fleet] {w.spec.name}: {w.error}", flush=True)
                return
            delay = min(self.sup.backoff_initial_s * 2 ** (w.crashes - 1), self.sup.backoff_max_s)
            w.set("restarting")
            print(f"[fleet] {w.spec.name}: {w.error}; restarting in {delay:g} s", flush=True)
            await self._sleep(delay)
            w.restarts += 1

    async def _wait_ready(self, w: WorkerState) -> Optional[str]:
        """None once ``/health`` answers 200; else why the start failed."""
        deadline = time.monotonic() + self.sup.start_timeout_s
        while not self.stopping:
            code = w.handle.exit_code()
            if code is not None:
                return f"exited with code {code} while starting"
            if time.monotonic() > deadline:
                return f"not healthy within start_timeout_s={self.sup.start_timeout_s:g}"
            if await self._probe(w.url, "/health", self.sup.health_timeout_s) is None:
                return None
            await asyncio.sleep(0.5)
        return "stopping"

    async def _watch(self, w: WorkerState) -> str:
        """Probe a healthy worker until it exits or fails too many probes in a row; why it ended."""
        fails, next_deep = 0, time.monotonic() + self.sup.deep_health_interval_s
        while not self.stopping:
            await self._sleep(self.sup.health_interval_s, w)
            code = w.handle.exit_code()
            if self.stopping:
                break
            if code is not None:
                return f"exited with code {code}"
            deep = time.monotonic() >= next_deep
            error = await self._probe(w.url, "/health", self.sup.health_timeout_s)
            if error is None and deep:
                next_deep = time.monotonic() + self.sup.deep_health_interval_s
                error = await self._deep_probe(w)
            if error is None:
                fails = 0
                if w.state != "healthy":
                    w.set("healthy")
                self.pool.set_up(w.spec.name, w.url)
                await self._read_load(w)
                continue
            fails += 1
            w.set("unhealthy")  # out of the router's rotation at once
            self.pool.set_down(w.spec.name)
            w.error = error
            if fails >= self.sup.unhealthy_after:
                return f"unhealthy: {fails} probes failed in a row, last: {error}"
        return "stopping"

    async def _probe(self, url: Optional[str], path: str, timeout: float) -> Optional[str]:
        """None if ``url+path`` answers 200, else what went wrong."""
        try:
            r = await self.probe.get(f"{url}{path}", timeout=timeout)
        except httpx.HTTPError as e:
            return f"{path}: {type(e).__name__}"
        return None if r.status_code == 200 else f"{path}: HTTP {r.status_code}"

    async def _deep_probe(self, w: WorkerState) -> Optional[str]:
        """Is the engine making tokens? Busy: its requests through the router must have moved within
        ``deep_health_timeout_s`` (a probe's one token would wait behind them); idle: one token
        through ``/health_generate``."""
        stalled = self.pool.stalled_for(w.spec.name)
        if stalled:
            limit = self.sup.deep_health_timeout_s
            return None if stalled < limit else f"no answer nor stream event for {stalled:.0f} s while busy"
        return await self._probe(w.url, "/health_generate", self.sup.deep_health_timeout_s)

    async def _read_load(self, w: WorkerState) -> None:
        """Running and waiting requests, from the worker's ``/metrics`` (for ``fleet status``)."""
        try:
            r = await self.probe.get(f"{w.url}/metrics", timeout=self.sup.health_timeout_s)
            w.running, w.waiting = parse_loads(r.text)
        except (httpx.HTTPError, ValueError):
            pass

    async def _sleep(self, seconds: float, w: Optional[WorkerState] = None) -> None:
        """Sleep, waking early when the fleet stops or (``w``) the worker exits."""
        end = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < end:
            if w is not None and w.handle.exit_code() is not None:
                return
            await asyncio.sleep(min(TICK_S, max(end - time.monotonic(), 0)))

    # -------------------------------------------------------------- the fleet
    async def run(self) -> int:
        server = FleetServer(self, uvicorn.Config(create_router_app(self.router), host=self.spec.host,
                                                  port=self.spec.router.port, log_level="warning",
                                                  timeout_graceful_shutdown=5, lifespan="off"))
        serve_task = asyncio.create_task(server.serve())
        while not server.started and not serve_task.done():
            await asyncio.sleep(0.05)
        if serve_task.done():
            print(f"[fleet] the router could not listen on {self.spec.host}:{self.spec.router.port}", flush=True)
            return 1
        tasks = [asyncio.create_task(self.run_worker(w)) for w in self.workers.values()]
        status_task = asyncio.create_task(self.status.loop())
        self.phase = "running"
        print(READY_LINE.format(name=self.spec.name, host=self.spec.host, port=self.spec.router.port), flush=True)
        while not self.stop_requested:
            await asyncio.sleep(TICK_S)
        await self.shutdown()
        server.should_exit = True
        await serve_task
        for t in tasks + [status_task]:
            t.cancel()
        await asyncio.gather(*tasks, status_task, return_exceptions=True)
        await self.probe.aclose()
        await self.router.client.aclose()
        self.status.write_now()
        print(f"[fleet] {self.spec.name}: stopped", flush=True)
        return 0

    async def shutdown(self) -> None:
        """Drain the router, then stop every worker."""
        self.phase = "draining"
        self.router.draining = True
        grace = 0.0 if self.force else self.sup.drain_timeout_s
        print(f"[fleet] draining: {self.router.inflight} request(s) in flight, grace {grace:g} s", flush=True)
        deadline = time.monotonic() + grace
        while self.router.inflight and time.monotonic() < deadline and not self.force:
            await asyncio.sleep(TICK_S)
        self.stopping = True
        await self._stop_workers(0.0 if self.force else self.sup.drain_timeout_s)
        self.phase = "stopped"

    async def _stop_workers(self, grace_s: float) -> None:
        for w in self.workers.values():
            if w.state != "failed":
                w.set("stopping")
        await asyncio.gather(*(w.handle.stop(grace_s) for w in self.workers.values()), return_exceptions=True)
        for w in self.workers.values():
            if w.state != "failed":
                w.set("stopped")
            self.pool.set_down(w.spec.name)


class FleetServer(uvicorn.Server):
    """uvicorn in the supervisor's loop; a signal asks the supervisor to drain and stop (a second
    one: stop now), and is not raised again when uvicorn returns."""

    def __init__(self, supervisor: Supervisor, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.supervisor = supervisor

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.supervisor.stop_requested:
            self.supervisor.force = True
        self.supervisor.stop_requested = True
