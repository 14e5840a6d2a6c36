"""Sessions: multi-turn conversations whose turns continue from earlier turns' tokens.

A turn's context is its parent turn's prompt and output plus the new input (API.md part A and
8.1); the radix cache then finds the parent's KV, and the session keeps the KV of its latest
turn locked in the cache until it is closed.

The turns form a tree, as SGLang's: a turn names its parent with ``rid`` (default: the latest
finished turn). A turn with ``replace=True`` starts a new branch at its parent and deletes every
turn after that parent (all turns, without ``rid``); deleted turns that still run are aborted,
and a later turn naming one is refused (SGLang's "Invalid request session id").

A session opened with ``timeout`` closes itself once that many seconds pass without a new turn
or a turn's end (never while a turn runs). A streaming session (``streaming=True``, with the
server's ``enable_streaming_session``) is a plain chain: one turn at a time, each appended to the
latest; a close asked while its turn runs takes effect when the turn ends.

``SessionTable`` holds the turns (no KV); ``Sessions`` is the scheduler's side: the table plus the
prefix-cache lock on each session's latest turn, and the timeouts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import msgspec

from treadle.runtime.messages import MmItem, SessionParams
from treadle.scheduler_proc.radix_cache import PrefixCache
from treadle.scheduler_proc.req import Req

logger = logging.getLogger("treadle.scheduler")
EXPIRY_CHECK_S = 1.0  # how often expire() looks for idle sessions


@dataclass
class Turn:
    input_ids: list[int]
    output_ids: list[int]
    finished: bool = False
    mm_items: list[MmItem] = field(default_factory=list)  # images of its whole context
    parent: Optional[str] = None  # rid of the turn it continues; None: the session's start


@dataclass
class Session:
    id: str
    turns: dict[str, Turn] = field(default_factory=dict)
    latest: Optional[str] = None  # rid of the latest finished turn
    lock_node: Any = None  # radix node kept locked for the latest turn
    timeout: Optional[float] = None  # seconds without activity before it closes itself
    streaming: bool = False
    last_active: float = field(default_factory=time.monotonic)
    closing: bool = False  # a close was asked while a streaming turn ran

    def running(self) -> bool:
        return any(not t.finished for t in self.turns.values())


class SessionTable:
    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}

    def open(self, sid: str, timeout: Optional[float] = None, streaming: bool = False) -> bool:
        if sid in self.sessions:
            return False
        self.sessions[sid] = Session(sid, timeout=timeout, streaming=streaming)
        return True

    def close(self, sid: str) -> Optional[Session]:
        """Remove the session and return it; a streaming session with a running turn is only
        marked (``closing``) and returned by ``finish`` when the turn ends."""
        sess = self.sessions.get(sid)
        if sess is not None and sess.streaming and sess.running():
            sess.closing = True
            return None
        return self.sessions.pop(sid, None)

    def expired(self, now: float) -> list[str]:
        """Ids of idle sessions whose timeout has passed."""
        return [s.id for s in self.sessions.values()
                if s.timeout is not None and now - s.last_active >= s.timeout and not s.running()]

    def context(self, sp: SessionParams, rid: str, new_ids: list[int], new_items: list[MmItem] = ()
                ) -> tuple[list[int], list[MmItem]]:
        """The full input of a turn and its images (the parent's, then the new input's, shifted);
        raises ValueError for an unknown session or parent, or an offset that cuts an image. The
        turn joins the session only with ``begin``, once the scheduler has accepted it."""
        sess = self.sessions.get(sp.id)
        if sess is None:
            raise ValueError(f"Invalid request: session id {sp.id} does not exist")
        if rid in sess.turns:
            raise ValueError(f"Invalid request: rid {rid} is already a turn of session {sp.id}")
        if sess.closing:
            raise ValueError(f"Invalid request: close was requested for session {sp.id}")
        if sess.streaming:
            _check_streaming_turn(sess, sp)
        fresh = sp.replace and sp.rid is None  # a fresh start: no parent (``begin`` clears the rest)
        parent_rid = sp.rid if sp.rid is not None or fresh else sess.latest
        items: list[MmItem] = []
        if parent_rid is None:
            ctx: list[int] = []
        else:
            parent = sess.turns.get(parent_rid)
            if parent is None:
                raise ValueError(f"Invalid request session id: rid {parent_rid} is not a turn of session {sp.id} "
                                 "(a turn with replace=True deletes the turns after its parent)")
            if not parent.finished:
                raise ValueError("Session request is appending to a request that hasn't finished.")
            ctx = parent.input_ids + ([] if sp.drop_previous_output else parent.output_ids)
            if sp.offset:
                ctx = ctx[: sp.offset]
            for it in parent.mm_items:
                if it.offset + it.num_tokens <= len(ctx):
                    items.append(it)
                elif it.offset < len(ctx):
                    raise ValueError(f"Invalid request: offset {sp.offset} cuts an image of the parent turn in two.")
        items += [msgspec.structs.replace(it, offset=it.offset + len(ctx)) for it in new_items]
        return ctx + new_ids, items

    def begin(self, sp: SessionParams, rid: str, input_ids: list[int], mm_items: list[MmItem]) -> list[str]:
        """An accepted turn (its full input from ``context``) joins its session. With ``replace`` it
        first deletes the turns after its parent (every turn, without ``rid``); returns the deleted
        turns that have not finished, which the scheduler aborts (SGLang's ``clear_children``)."""
        sess = self.sessions[sp.id]
        fresh = sp.replace and sp.rid is None
        parent = None if fresh else (sp.rid if sp.rid is not None else sess.latest)
        unfinished: list[str] = []
        if sp.replace:
            gone = list(sess.turns) if fresh else _descendants(sess, parent)
            unfinished = [r for r in gone if not sess.turns[r].finished]
            for r in gone:
                del sess.turns[r]
            if sess.latest not in sess.turns:
                sess.latest = parent  # the branch point is the latest finished turn left
        sess.turns[rid] = Turn(input_ids=input_ids, output_ids=[], mm_items=mm_items, parent=parent)
        sess.last_active = time.monotonic()
        return unfinished

    def drop(self, sid: str, rid: str) -> None:
        """Forget a turn that failed before it ran (it has no output to continue from)."""
        sess = self.sessions.get(sid)
        if sess is not None:
            sess.turns.pop(rid, None)

    def finish(self, sid: str, rid: str, output_ids: list[int]) -> Optional[Session]:
        """Record a turn's end; returns its session (whose ``closing`` says to close it now). Called
        when the turn's result goes out and again at its release: the first call counts (a later
        turn may have finished in between and is the latest)."""
        sess = self.sessions.get(sid)
        if sess is None or rid not in sess.turns:
            return None
        turn = sess.turns[rid]
        if not turn.finished:
            turn.output_ids, turn.finished = list(output_ids), True
            sess.latest = rid
        sess.last_active = time.monotonic()
        return sess


class Sessions:
    """The session half of the scheduler: the table, and the prefix-cache lock that keeps the KV of
    each session's latest turn until the session closes (so the next turn finds it)."""

    def __init__(self, cache: PrefixCache) -> None:
        self.table = SessionTable()
        self.cache = cache
        self._expiry_checked = 0.0  # when expire() last looked

    @property
    def sessions(self) -> dict[str, Session]:
        """The open sessions by id."""
        return self.table.sessions

    def open(self, sid: str, timeout: Optional[float] = None, streaming: bool = False) -> bool:
        return self.table.open(sid, timeout, streaming)

    def close(self, sid: str) -> bool:
        sess = self.table.close(sid)
        if sess is not None and sess.lock_node is not None:
            self.cache.unlock(sess.lock_node)
        return sess is not None

    def turn_done(self, req: Req) -> None:
        """A turn ended (finished, aborted, or never run): keep the KV of a session's latest turn
        locked in the cache until the session closes; a close asked meanwhile happens now. Call it
        after the request's pages went into the cache."""
        if req.tokenized.session is None:
            return
        sid = req.tokenized.session.id
        sess = self.table.finish(sid, req.rid, req.output_ids)
        if sess is not None and sess.closing:  # a close asked while the streaming turn ran
            self.close(sid)
            return
        if sess is None:
            return
        _, node = self.cache.match_prefix(req.key_ids(), namespace=req.cache_namespace)
        self.cache.lock(node)
        if sess.lock_node is not None:
            self.cache.unlock(sess.lock_node)
        sess.lock_node = node

    def expire(self) -> None:
        """Close sessions idle past their timeout; looks about once a second."""
        now = time.monotonic()
        if now - self._expiry_checked < EXPIRY_CHECK_S:
            return
        self._expiry_checked = now
        for sid in self.table.expired(now):
            logger.info("session %s closed after its timeout", sid)
            self.close(sid)

    def unlock_all(self) -> None:
        """Before the prefix cache is emptied (``flush_cache``): the sessions lose their KV."""
        for sess in self.table.sessions.values():
            if sess.lock_node is not None:
                self.cache.unlock(sess.lock_node)
                sess.lock_node = None


def _descendants(sess: Session, rid: Optional[str]) -> list[str]:
    """The turns after ``rid`` in the session's tree (children, their children, ...)."""
    found: list[str] = []
    frontier = {rid}
    while frontier:
        children = [r for r, t in sess.turns.items() if t.parent in frontier and r not in found]
        found += children
        frontier = set(children)
    return found


def _check_streaming_turn(sess: Session, sp: SessionParams) -> None:
    """A streaming session's turns form a chain: one at a time, each a plain append."""
    if sess.running():
        raise ValueError("Streaming session already has an active request.")
    for name in ("replace", "offset", "drop_previous_output"):
        if getattr(sp, name):
            raise ValueError(f"Invalid request: {name} is not supported in a streaming session (only plain appends).")
    if sp.rid is not None and sp.rid != sess.latest:
        raise ValueError(f"Invalid request: a streaming session appends to its latest turn ({sess.latest}), "
                         f"not to {sp.rid}.")
