"""The engine's private I/O thread: launches the children, routes their messages, watches them.

It is the only reader of the client inbox. Outputs are handed to per-request states, whose
``deliver`` callbacks wake the waiting caller (a queue for sync calls, the caller's own event
loop for async ones). A child that exits or reports a failure fails every pending request
with ``EngineDeadError`` within one poll interval, and later calls raise it at once.
"""

from __future__ import annotations

import concurrent.futures
import logging
import subprocess
import threading
from typing import Any, Callable, Optional

import msgspec
import zmq

from treadle.client.results import ReqState
from treadle.runtime.errors import EngineDeadError, EngineOverloadedError
from treadle.runtime.messages import (
    CLIENT_IN, ChildFailed, ChildReady, ControlReply, ReqError, StrOutBatch,
)
from treadle.runtime.zmq_utils import Receiver

logger = logging.getLogger("treadle.engine")
POLL_MS = 100
ERRORS = {"value": ValueError, "type": TypeError, "overloaded": EngineOverloadedError, "runtime": RuntimeError}


class Supervisor:
    def __init__(self, ctx: zmq.Context, inbox_endpoint: str, launch: Callable[[], dict[str, subprocess.Popen]],
                 incremental: bool) -> None:
        self.inbox = Receiver(ctx, inbox_endpoint, CLIENT_IN, bind=True)
        self.launch = launch
        self.incremental = incremental
        self.procs: dict[str, subprocess.Popen] = {}
        self.ready_info: dict[str, dict[str, Any]] = {}
        self.started: concurrent.futures.Future = concurrent.futures.Future()
        self.lock = threading.Lock()
        self.states: dict[str, tuple[ReqState, bool]] = {}  # rid -> (state, stream)
        self.call_rids: dict[int, list[str]] = {}
        self.controls: dict[int, concurrent.futures.Future] = {}
        self.dead: Optional[EngineDeadError] = None
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="treadle-io", daemon=True)

    # ------------------------------------------------------------------ registration
    def register(self, call_id: int, states: list[tuple[ReqState, bool]]) -> None:
        with self.lock:
            if self.dead is not None:
                raise self.dead
            for st, stream in states:
                if st.rid in self.states:
                    raise ValueError(f"Duplicate request ID detected: {st.rid} is still running.")
            for st, stream in states:
                self.states[st.rid] = (st, stream)
            self.call_rids[call_id] = [st.rid for st, _ in states]

    def unregister_call(self, call_id: int) -> list[str]:
        """Forget a call's requests; returns the rids that had not finished (to abort them)."""
        with self.lock:
            rids = self.call_rids.pop(call_id, [])
            return [r for r in rids if self.states.pop(r, None) is not None]

    def add_control(self, call_id: int) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self.lock:
            if self.dead is not None:
                raise self.dead
            self.controls[call_id] = fut
        return fut

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        try:
            self.procs = self.launch()
        except BaseException as e:  # noqa: BLE001 - handed to the constructor's thread
            self.started.set_exception(e)
            return
        while not self.stopping:
            try:
                msg = self.inbox.recv(POLL_MS)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                logger.error("dropped a malformed message: %s", e)
                continue
            except zmq.ZMQError:
                if self.stopping:
                    return
                raise
            if msg is not None:
                self._dispatch(msg)
            self._check_children()

    def _check_children(self) -> None:
        if self.stopping or self.dead is not None:
            return
        for name, proc in self.procs.items():
            code = proc.poll()
            if code is not None:
                self._fail(f"The {name} process exited unexpectedly (exit code {code}).")
                return

    def _dispatch(self, msg: Any) -> None:
        if isinstance(msg, StrOutBatch):
            for out in msg.outs:
                with self.lock:
                    entry = self.states.get(out.rid)
                    if entry is not None and out.finish is not None:
                        self.states.pop(out.rid)
                if entry is None:
                    continue
                st, stream = entry
                chunk = st.update(out, self.incremental, stream)
                if chunk is not None:
                    self._deliver(st, chunk)
        elif isinstance(msg, ReqError):
            err = ERRORS.get(msg.kind, RuntimeError)(msg.message)
            with self.lock:
                rids = self.call_rids.get(msg.call_id, []) if msg.call_id >= 0 else msg.rids
                found = [self.states.pop(r)[0] for r in rids if r in self.states]
            for st in found:
                self._deliver(st, err)
        elif isinstance(msg, ControlReply):
            with self.lock:
                fut = self.controls.pop(msg.call_id, None)
            if fut is not None:
                if msg.ok:
                    fut.set_result(msg.result)
                else:
                    fut.set_exception(RuntimeError(msg.error))
        elif isinstance(msg, ChildReady):
            self.ready_info[msg.name] = msg.info
            logger.info("%s ready", msg.name)
            if set(self.ready_info) >= set(self.procs) and not self.started.done():
                self.started.set_result(True)
        elif isinstance(msg, ChildFailed):
            last = msg.error.strip().splitlines()[-1] if msg.error.strip() else "unknown error"
            self._fail(f"The {msg.name} process failed: {last}", detail=msg.error)

    def _deliver(self, st: ReqState, item: Any) -> None:
        try:
            st.deliver(item)
        except RuntimeError:  # the caller's event loop is gone; nobody is waiting any more
            pass

    def _fail(self, message: str, detail: str = "") -> None:
        """Mark the engine dead and fail everything pending (start-up, requests, control calls)."""
        if not self.started.done():
            self.started.set_exception(RuntimeError(f"{message}\n{detail}".strip()))
        with self.lock:
            self.dead = EngineDeadError(message)
            states = [st for st, _ in self.states.values()]
            controls = list(self.controls.values())
            self.states.clear()
            self.controls.clear()
        logger.error(message)
        for st in states:
            self._deliver(st, self.dead)
        for fut in controls:
            fut.set_exception(self.dead)

    def stop(self, reason: str) -> None:
        self.stopping = True
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(timeout=5)
        with self.lock:
            if self.dead is None:
                self.dead = EngineDeadError(reason)
        self._fail_pending()
        self.inbox.close()

    def _fail_pending(self) -> None:
        with self.lock:
            states = [st for st, _ in self.states.values()]
            controls = list(self.controls.values())
            self.states.clear()
            self.controls.clear()
        for st in states:
            self._deliver(st, self.dead)
        for fut in controls:
            if not fut.done():
                fut.set_exception(self.dead)
