"""One worker of a local fleet: a ``treadle serve`` child in a process group of its own, its
output appended to the worker's log file, on the GPUs the spec gives it (``CUDA_VISIBLE_DEVICES``).
The supervisor decides when to start, stop or kill it; this class only does it."""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Optional

from treadle.deploy.proc_tree import alive, descendants, kill_all
from treadle.deploy.spec import FleetSpec, WorkerSpec, worker_argv, worker_env

PR_SET_PDEATHSIG = 1


def _drain_with_parent() -> None:
    """In the worker before exec: SIGTERM (a drain) when the supervisor dies, even by SIGKILL, so
    that a lost supervisor never leaves workers holding their ports and GPUs."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def connect_host(host: str) -> str:
    """The address to reach a server bound to ``host`` from this machine."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


class LocalWorker:
    def __init__(self, spec: WorkerSpec, fleet: FleetSpec) -> None:
        self.spec, self.fleet = spec, fleet
        self.proc: Optional[subprocess.Popen] = None
        self.port = spec.port
        self.log_path = fleet.log_path(spec.name)
        self._log_start = 0

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else None

    async def start(self) -> str:
        """Start the process; its URL (it answers once ``/health`` does)."""
        self.port = self.spec.port or free_port(self.fleet.host)
        argv = [sys.executable, "-m", "treadle.serve", *worker_argv(self.spec, self.fleet.host, self.port)]
        env = worker_env(dict(os.environ), self.fleet.api_key)
        if self.spec.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, self.spec.gpus))
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._log_start = log.tell()
            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, start_new_session=True, preexec_fn=_drain_with_parent)
        return f"http://{connect_host(self.fleet.host)}:{self.port}"

    def exit_code(self) -> Optional[int]:
        return self.proc.poll() if self.proc is not None else None

    async def stop(self, grace_s: float) -> None:
        """SIGTERM (``treadle serve`` drains its requests), then SIGKILL after ``grace_s``."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + grace_s
            while self.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        await self.kill()

    async def kill(self) -> None:
        """SIGKILL the process, its group and every descendant; reap it."""
        if self.proc is None:
            return
        tree = descendants(self.proc.pid) if self.proc.poll() is None else []
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        kill_all(tree)
        while self.proc.poll() is None:
            await asyncio.sleep(0.05)
        for _ in range(100):  # the engine children, reparented, die by SIGKILL or PDEATHSIG
            if not any(alive(p) for p in tree):
                break
            await asyncio.sleep(0.05)

    def error_tail(self) -> str:
        """The last telling line this start wrote (``treadle serve`` says why a start failed)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_start)
                lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        lines = [ln for ln in lines if not ln.startswith("===")]
        telling = [ln for ln in lines if "failed" in ln or "Error" in ln or "died" in ln]
        return (telling or lines or [""])[-1][:500]
