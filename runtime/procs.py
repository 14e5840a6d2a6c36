"""Launching child processes and the bootstrap every child runs.

Children are started with ``subprocess`` as ``python -m treadle.<package>`` (a fresh
interpreter, like multiprocessing's spawn, but without re-importing the user's ``__main__``,
so scripts need no ``if __name__ == "__main__"`` guard). Each runs in its own session so a
terminal Ctrl-C reaches only the user's process, exits when its parent dies (Linux
parent-death signal plus a ppid watchdog), and reports an exception to the client as a
``ChildFailed`` message before exiting.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import msgspec
import zmq

from treadle.runtime.logging_utils import configure_logging
from treadle.runtime.messages import ChildFailed, Heartbeat
from treadle.runtime.model_files import ModelFiles
from treadle.runtime.server_args import ServerArgs
from treadle.runtime.zmq_utils import Sender

logger = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1
HEARTBEAT_S = 1.0  # how often every child tells the client it is alive (client/supervisor.py checks)


@dataclass
class ChildSpec:
    """Everything a child needs to start, written as JSON into the engine's ipc directory."""

    name: str
    module: str
    server_args: dict[str, Any]
    model_files: dict[str, Any]
    endpoints: dict[str, str]
    parent_pid: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def args(self) -> ServerArgs:
        return ServerArgs(**self.server_args)

    @property
    def files(self) -> ModelFiles:
        return ModelFiles(**self.model_files)


def launch_child(spec: ChildSpec, ipc_path: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    path = os.path.join(ipc_path, f"{spec.name}.json")
    with open(path, "w") as f:
        json.dump(spec.__dict__, f)
    child_env = dict(os.environ)
    child_env.update(env or {})
    return subprocess.Popen(
        [sys.executable, "-m", spec.module, path],
        env=child_env,
        start_new_session=True,
        stdin=subprocess.DEVNULL,
    )


def kill_child(proc: subprocess.Popen, grace_s: float = 2.0) -> None:
    """Wait briefly for a clean exit, then SIGKILL the child's whole process group."""
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _watch_parent(parent_pid: int) -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass
    if os.getppid() != parent_pid:
        os._exit(1)

    def loop() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=loop, name="parent-watch", daemon=True).start()


def _beat(ctx: zmq.Context, endpoint: str, name: str) -> Callable[[], None]:
    """Tell the client every ``HEARTBEAT_S`` that this process runs. A thread of its own, with its
    own socket (ZeroMQ sockets are not shared between threads): the beats go on during a long
    step, and stop only when the whole process stops (SIGSTOP) or never lets the thread run.
    Returns how to stop it (the thread closes its socket, so the context can be terminated)."""
    sender, beat = Sender(ctx, endpoint), msgspec.msgpack.encode(Heartbeat(name=name))
    stopping = threading.Event()

    def loop() -> None:
        while not stopping.is_set():
            sender.send_bytes(beat)
            stopping.wait(HEARTBEAT_S)
        sender.close()

    thread = threading.Thread(target=loop, name="heartbeat", daemon=True)
    thread.start()
    return lambda: (stopping.set(), thread.join(timeout=2 * HEARTBEAT_S))


# The light processes (tokenizer, detokenizer, scheduler) run no large tensor math: one thread each,
# so their wake-ups never take a core from the worker's matmuls.
LIGHT_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
WORKER_SPINCOUNT = 1000  # libgomp's spins before an idle thread sleeps (its default: 300,000)


def thread_env(module: str, server_args: dict[str, Any], environ: dict[str, str],
               cores: Optional[int] = None) -> dict[str, str]:
    """The OpenMP/BLAS settings a child starts with (set before torch is imported: libgomp reads
    them when it loads). Light processes get one thread. A CPU worker's idle OpenMP threads spin
    only ``WORKER_SPINCOUNT`` times before they sleep, instead of libgomp's 300,000. The long spin
    burns a core between parallel regions, and on a machine other jobs load, a spinning thread
    holds the core its partner needs: batch-1 decode took 0.32-0.66 CPU-s a token instead of
    0.05. A short spin still covers a region's own barrier, so an idle machine loses no speed (a
    passive wait, no spin at all, was ~17% slower there; docs/perf.md, CPU section). Several
    worker ranks on one CPU node share its cores. What the user set is kept."""
    if not module.startswith("treadle.gpu_worker"):
        return dict(LIGHT_THREAD_ENV)
    if not str(server_args.get("device", "cpu")).startswith("cpu"):
        return {}
    env = {}
    if "OMP_WAIT_POLICY" not in environ and "GOMP_SPINCOUNT" not in environ:
        env["GOMP_SPINCOUNT"] = str(WORKER_SPINCOUNT)
    ranks = server_args.get("tp_size", 1) * server_args.get("pp_size", 1) * server_args.get("dp_size", 1)
    local = max(1, ranks // max(1, server_args.get("nnodes", 1)))
    if local > 1 and "OMP_NUM_THREADS" not in environ:  # one rank keeps torch's default (physical cores)
        env["OMP_NUM_THREADS"] = str(max(1, (cores or len(os.sched_getaffinity(0))) // local))
    return env


def run_child(module: str) -> None:
    """Entry point of every child: ``module.main(spec, zmq_context, client_inbox)`` runs its loop.
    The module is imported here, after the inbox is connected, so that an import error (a missing
    package, a broken install) reaches the client as this child's ``ChildFailed`` too."""
    with open(sys.argv[1]) as f:
        spec = ChildSpec(**json.load(f))
    os.environ.update(thread_env(module, spec.server_args, dict(os.environ)))
    _watch_parent(spec.parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(spec.server_args.get("log_level", "error"), spec.name)
    ctx = zmq.Context()
    inbox = Sender(ctx, spec.endpoints["client"])
    stop_beats = _beat(ctx, spec.endpoints["client"], spec.name)
    code = 0
    try:
        main: Callable[[ChildSpec, zmq.Context, Sender], None] = importlib.import_module(module).main
        main(spec, ctx, inbox)
    except Exception:
        code = 1
        text = traceback.format_exc()
        logging.getLogger("treadle").error("%s failed:\n%s", spec.name, text)
        inbox.send(ChildFailed(name=spec.name, error=text))
    # A failure report must reach the client before the exit: ZeroMQ sends from its own I/O thread,
    # and only terminating the context waits for it (closing the socket with a linger does not,
    # when os._exit follows). Every socket is closed first (the beat thread closes its own), so the
    # wait is for pending messages only, at most 2 s.
    stop_beats()
    ctx.destroy(linger=2000 if code else 0)
    os._exit(code)
