"""``backend = "ray"``: each worker is a Ray actor holding one ``treadle serve`` process.

Ray places the actor anywhere in the cluster with ``num_gpus = tp_size x dp_size`` (0 when the
cluster has no GPU: the CPU test) and restarts it when it dies (``max_restarts``); Ray sets the
actor's ``CUDA_VISIBLE_DEVICES``, so a worker's ``gpus`` in the spec does not apply. The actor
starts its server on a free port of its node and answers ``info()`` with the URL; the supervisor
(the same as the local backend's) asks for it after each (re)start, probes it, and sends
traffic there through the router. The server dies with its actor (PDEATHSIG) and the actor with
its server (a thread exits the actor's process), so either failure is one Ray restart.

``[ray] address``: ``""`` starts a local Ray in the supervisor (stopped with it); ``"auto"`` or
``"ray://head:10001"`` joins a cluster started with ``ray start --head``.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Optional

import ray

from treadle.deploy.local_worker import connect_host, free_port
from treadle.deploy.spec import FleetSpec, WorkerSpec, worker_argv, worker_env

PR_SET_PDEATHSIG = 1
INFO_TIMEOUT_S = 900.0
DEATH_NOTICE_S = 2.0  # how long Ray may take to tell that an actor died (before we kill it ourselves)  # a (re)start: placement, the engine's start, possibly a model download


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@ray.remote(max_concurrency=4)
class ServeActor:
    """One ``treadle serve`` on this actor's node; the actor lives exactly as long as it does."""

    def __init__(self, serve_argv: list[str], bind_host: str, log_path: Optional[str],
                 api_key: Optional[str] = None) -> None:
        host = ray.util.get_node_ip_address() if bind_host == "node" else bind_host
        self.port = free_port(host)
        self.url = f"http://{connect_host(host)}:{self.port}"
        argv = [sys.executable, "-m", "treadle.serve", "--host", host, "--port", str(self.port), *serve_argv]
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=worker_env(dict(os.environ), api_key), start_new_session=True,
                                     preexec_fn=_die_with_parent)
        threading.Thread(target=self._exit_with_server, daemon=True).start()

    def _exit_with_server(self) -> None:
        self.proc.wait()
        time.sleep(0.2)
        os._exit(1)  # the actor dies with its server: Ray restarts both

    def info(self) -> dict[str, Any]:
        return {"url": self.url, "pid": self.proc.pid, "actor_pid": os.getpid()}

    @ray.method(max_task_retries=0)  # not retried on the restarted actor: the caller must see the death
    def wait(self) -> int:
        """Returns (or fails, with the actor) when the server exits."""
        return self.proc.wait()

    def stop(self, grace_s: float) -> int:
        """SIGTERM (the server drains), then SIGKILL to its group after ``grace_s``."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                return self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.wait()


class RayWorker:
    """The supervisor's handle on a worker actor (the ``Handle`` protocol of ``supervisor.py``)."""

    def __init__(self, spec: WorkerSpec, fleet: FleetSpec, num_gpus: float, bind_host: str,
                 owns_ray: bool) -> None:
        self.spec, self.fleet, self.num_gpus, self.bind_host = spec, fleet, num_gpus, bind_host
        self.owns_ray = owns_ray
        self.actor: Any = None
        self.pid: Optional[int] = None
        self.actor_pid: Optional[int] = None
        self.log_path = fleet.log_path(spec.name) if not fleet.ray.address else None
        self._exit_ref: Any = None

    async def start(self) -> str:
        if self.actor is None:
            argv = worker_argv(self.spec, "", 0)[4:]  # host and port: the actor's
            if self.log_path:
                os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
            self.actor = ServeActor.options(
                name=f"treadle-{self.fleet.name}-{self.spec.name}", num_gpus=self.num_gpus, num_cpus=1,
                max_restarts=self.fleet.ray.max_restarts, max_task_retries=-1,
            ).remote(argv, self.bind_host, self.log_path, self.fleet.api_key)  # an argument: not in Ray's env listing
        info = await asyncio.wait_for(_get(self.actor.info.remote()), INFO_TIMEOUT_S)
        self.pid, self.actor_pid = info["pid"], info["actor_pid"]
        self._exit_ref = self.actor.wait.remote()
        return info["url"]

    def exit_code(self) -> Optional[int]:
        if self._exit_ref is None:
            return None
        ready, _ = ray.wait([self._exit_ref], timeout=0)
        if not ready:
            return None
        try:
            return int(ray.get(ready[0]))
        except ray.exceptions.RayError:
            return -9  # the actor died (its server with it)

    async def kill(self) -> None:
        """Have Ray restart the worker: nothing to do when it died by itself (Ray restarts it
        already); kill a live but failing actor with ``no_restart=False``."""
        if self.actor is not None and self._exit_ref is not None:
            ready, _ = await asyncio.to_thread(ray.wait, [self._exit_ref], timeout=DEATH_NOTICE_S)
            if not ready:  # alive but failing (frozen, not answering): make Ray restart it
                ray.kill(self.actor, no_restart=False)
        self._exit_ref = None

    async def stop(self, grace_s: float) -> None:
        if self.actor is None:
            return
        try:
            await asyncio.wait_for(_get(self.actor.stop.remote(grace_s)), grace_s + 10)
        except (ray.exceptions.RayError, asyncio.TimeoutError):
            pass
        ray.kill(self.actor, no_restart=True)
        self.actor = None

    def error_tail(self) -> str:
        return ""

    def close_backend(self) -> None:
        if self.owns_ray and ray.is_initialized():
            ray.shutdown()


async def _get(ref: Any) -> Any:
    return await asyncio.to_thread(ray.get, ref)


def ray_handles(spec: FleetSpec) -> dict[str, RayWorker]:
    """Join (or start) Ray and make a handle per worker; the actors start with the supervisor."""
    env = {k: os.environ[k] for k in ("PYTHONPATH",) if os.environ.get(k)}
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                              "runtime_env": {"env_vars": env} if env else None}
    local = not spec.ray.address
    if local:
        kwargs["num_cpus"] = spec.ray.num_cpus
    ray.init(address=spec.ray.address or None, **kwargs)
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    bind_host = spec.host if local else "node"
    out = {}
    for w in spec.workers:
        gpus = w.tp_size * int(w.engine.get("dp_size", 1) or 1) if has_gpus and w.engine.get("device") != "cpu" else 0
        out[w.name] = RayWorker(w, spec, gpus, bind_host, owns_ray=local)
    return out
