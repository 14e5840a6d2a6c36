"""The engine's private I/O thread: launches the children, routes their messages, watches them.

It is the only reader of the client inbox. Outputs are handed to per-request states, whose
``deliver`` callbacks wake the waiting caller (a queue for sync calls, the caller's own event
loop for async ones). A child that exits or reports a failure fails every pending request
with ``EngineDeadError`` within one poll interval, and later calls raise it at once. With
``dp_size > 1`` the death of a scheduler group's process takes only that group out of service:
its other processes are stopped, the tokenizer fails the group's requests (``GroupDown``) and
routes around it; the engine dies when no group is left.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import subprocess
import threading
import time
from typing import Any, Callable, Iterable, Optional

import msgspec
import zmq

from treadle.client.results import ReqState
from treadle.runtime.errors import EngineDeadError, EngineOverloadedError
from treadle.runtime.messages import (
    CLIENT_IN, ChildFailed, ChildReady, GroupDown, Heartbeat, Reply, ReqError, ReqsDone, StrOutBatch,
)
from treadle.runtime.procs import kill_child
from treadle.runtime.zmq_utils import Receiver

logger = logging.getLogger("treadle.engine")
POLL_MS = 100
# A child whose heartbeats (runtime/procs.py, one a second) stop for this long is declared frozen:
# its pending calls fail with EngineDeadError naming it. The beats come from a thread of their own,
# so a long step never delays them; only a stopped or wedged process does. The environment
# variable TREADLE_HEARTBEAT_TIMEOUT_S overrides it (read when an engine starts).
HEARTBEAT_TIMEOUT_S = 10.0
LAST_WORDS_S = 0.5  # how long a child's exit waits for its failure report before it counts as unexplained
IO_STALL_S = 1.0
# A child's first beat comes once its bootstrap runs (runtime/procs.run_child, before its heavy
# imports); one silent this much longer than the timeout after it was started is frozen too.
FIRST_BEAT_GRACE_S = 10.0  # this thread itself did not run for this long: the beats may be waiting unread
ERRORS = {"value": ValueError, "type": TypeError, "overloaded": EngineOverloadedError, "runtime": RuntimeError,
          "dead": EngineDeadError}


def group_name(dp_rank: int, name: str) -> str:
    """A DP group's process name: group 0 keeps the plain names (``scheduler``, ``worker0``)."""
    return name if dp_rank == 0 else f"dp{dp_rank}_{name}"


def dp_rank_of(name: str) -> Optional[int]:
    """The DP group of a process name; None for the shared tokenizer and detokenizer."""
    if name in ("tokenizer", "detokenizer"):
        return None
    return int(name[2:name.index("_")]) if name.startswith("dp") else 0


class Supervisor:
    def __init__(self, ctx: zmq.Context, inbox_endpoint: str, launch: Callable[[], dict[str, subprocess.Popen]],
                 incremental: bool, report: Optional[Callable[[Any], None]] = None) -> None:
        self.inbox = Receiver(ctx, inbox_endpoint, CLIENT_IN, bind=True)
        self.launch = launch
        self.incremental = incremental
        self.procs: dict[str, subprocess.Popen] = {}
        self.ready_info: dict[str, dict[str, Any]] = {}
        self.started: concurrent.futures.Future = concurrent.futures.Future()
        self.lock = threading.Lock()
        self.states: dict[str, tuple[ReqState, bool]] = {}  # rid -> (state, stream)
        self.call_rids: dict[int, list[str]] = {}
        self.controls: dict[int, tuple[concurrent.futures.Future, Optional[int]]] = {}  # call id -> (future, dp rank)
        self.dead: Optional[EngineDeadError] = None
        self.report = report  # sends ReqsDone / GroupDown to the tokenizer (only with dp_size > 1)
        self.dead_groups: dict[int, str] = {}  # dp rank -> why it is out of service
        self.stopping = False
        self.workers_only = False  # node_rank > 0: node 0 stops these workers, so a clean exit is no failure
        self.beats: dict[str, float] = {}  # child name -> when its last heartbeat was read
        self.heartbeat_timeout = float(os.environ.get("TREADLE_HEARTBEAT_TIMEOUT_S", HEARTBEAT_TIMEOUT_S))
        self.last_loop = time.monotonic()
        self.launched_at = time.monotonic()
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

    def add_control(self, call_id: int, dp_rank: Optional[int] = None) -> concurrent.futures.Future:
        """A future for the reply to a control call answered by DP group ``dp_rank`` (None: the tokenizer)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self.lock:
            if self.dead is not None:
                raise self.dead
            if dp_rank in self.dead_groups:
                raise EngineDeadError(self.dead_groups[dp_rank])
            self.controls[call_id] = (fut, dp_rank)
        return fut

    def live_groups(self) -> list[int]:
        """The DP ranks still in service (any thread; never call it holding ``lock``)."""
        with self.lock:
            dead = set(self.dead_groups)
        return sorted({dp_rank_of(n) for n in self.procs} - {None} - dead)  # type: ignore[operator]

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        try:
            self.launched_at = time.monotonic()
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
        now = time.monotonic()
        if now - self.last_loop > IO_STALL_S:  # this thread was starved: queued beats are not late ones
            self.beats = dict.fromkeys(self.beats, now)
        self.last_loop = now
        for name, proc in self.procs.items():
            if dp_rank_of(name) in self.dead_groups:
                continue
            code = proc.poll()
            if code is not None and not (code == 0 and self.workers_only):
                self._read_last_words()  # its ChildFailed (the cause) may still be on its way
                if self.dead is None and dp_rank_of(name) not in self.dead_groups:
                    self._child_died(name, f"The {name} process exited unexpectedly (exit code {code}).")
                return
            silent = now - self.beats.get(name, self.launched_at + FIRST_BEAT_GRACE_S)
            if code is None and silent > self.heartbeat_timeout:
                kill_child(proc, grace_s=0)  # frozen: it would never answer, and SIGKILL reaches a stopped process
                self._child_died(name, f"The {name} process stopped responding (no heartbeat for {silent:.1f} s; "
                                       f"frozen or deadlocked) and was killed.")
                return

    def _read_last_words(self) -> None:
        """A child that fails sends ``ChildFailed`` (with its traceback) just before it exits, but the
        exit may be seen first: read what is in flight for a moment, so the caller gets the cause
        rather than only an exit code."""
        deadline = time.monotonic() + LAST_WORDS_S
        while time.monotonic() < deadline and self.dead is None:
            try:
                msg = self.inbox.recv(10)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            if msg is not None:
                self._dispatch(msg)

    def _dispatch(self, msg: Any) -> None:
        if isinstance(msg, StrOutBatch):
            self._report_done(o.rid for o in msg.outs if o.finish is not None)  # before a caller may reuse a rid
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
            self._report_done(msg.rids)
            with self.lock:
                rids = self.call_rids.get(msg.call_id, []) if msg.call_id >= 0 else msg.rids
                found = [self.states.pop(r)[0] for r in rids if r in self.states]
            for st in found:
                self._deliver(st, err)
        elif isinstance(msg, Reply):
            with self.lock:
                fut, _ = self.controls.pop(msg.call_id, (None, None))
            if fut is not None:
                if msg.ok:
                    fut.set_result(msg.result)
                else:
                    fut.set_exception(RuntimeError(msg.error))
        elif isinstance(msg, Heartbeat):
            self.beats[msg.name] = time.monotonic()
        elif isinstance(msg, ChildReady):
            self.ready_info[msg.name] = msg.info
            logger.info("%s ready", msg.name)
            if set(self.ready_info) >= set(self.procs) and not self.started.done():
                self.started.set_result(True)
        elif isinstance(msg, ChildFailed):
            last = msg.error.strip().splitlines()[-1] if msg.error.strip() else "unknown error"
            self._child_died(msg.name, f"The {msg.name} process failed: {last}", detail=msg.error)

    def _deliver(self, st: ReqState, item: Any) -> None:
        try:
            st.deliver(item)
        except RuntimeError:  # the caller's event loop is gone; nobody is waiting any more
            pass

    def _report_done(self, rids: Iterable[str]) -> None:
        if self.report is not None:
            done = list(rids)
            if done:
                self.report(ReqsDone(rids=done))

    def _child_died(self, name: str, message: str, detail: str = "") -> None:
        g = dp_rank_of(name)
        if g in self.dead_groups:  # a late report from a group already out of service
            return
        if g is None or not self.started.done() or not set(self.live_groups()) - {g}:
            self._fail(message, detail)
        else:
            self._fail_group(g, message)

    def _fail_group(self, g: int, message: str) -> None:
        """Take DP group ``g`` out of service: stop its other processes (they would wait forever on
        the dead one), fail its pending control calls, and tell the tokenizer, which fails the
        group's requests with ``EngineDeadError`` and routes new ones to the live groups."""
        others = [r for r in self.live_groups() if r != g]
        message = f"{message} DP group {g} is out of service (its requests failed); groups {others} keep serving."
        with self.lock:
            self.dead_groups[g] = message
            ids = [cid for cid, (_, r) in self.controls.items() if r == g]
            controls = [self.controls.pop(cid)[0] for cid in ids]
        logger.error(message)
        for name, proc in self.procs.items():
            if dp_rank_of(name) == g:
                kill_child(proc, grace_s=0)
        if self.report is not None:
            self.report(GroupDown(dp_rank=g, message=message))
        for fut in controls:
            fut.set_exception(EngineDeadError(message))

    def _fail(self, message: str, detail: str = "") -> None:
        """Mark the engine dead and fail everything pending (start-up, requests, control calls)."""
        if not self.started.done():
            self.started.set_exception(RuntimeError(f"{message}\n{detail}".strip()))
        with self.lock:
            self.dead = EngineDeadError(message)
            states = [st for st, _ in self.states.values()]
            controls = [fut for fut, _ in self.controls.values()]
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
            controls = [fut for fut, _ in self.controls.values()]
            self.states.clear()
            self.controls.clear()
        for st in states:
            self._deliver(st, self.dead)
        for fut in controls:
            if not fut.done():
                fut.set_exception(self.dead)
