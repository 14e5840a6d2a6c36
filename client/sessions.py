"""Multi-turn sessions on the client's side: which DP group holds each session, and the
``session_params`` a turn carries.

A session lives in one DP group (its KV stays cached there), chosen when it opens; each of its
turns is sent to that group. The scheduler keeps the session itself (``scheduler_proc/sessions.py``).
"""

from __future__ import annotations

import uuid
from typing import Any, Optional

import msgspec

from treadle.client.control import Control
from treadle.runtime.messages import SessionParams


class Sessions:
    """The session id -> DP group map, as ``open_session`` placed them."""

    def __init__(self, streaming_enabled: bool) -> None:
        self.streaming_enabled = streaming_enabled
        self.groups: dict[str, int] = {}  # session id -> the DP group holding its KV
        self.timed: set[str] = set()  # of those, the ones a scheduler may close on its own (timeout)

    def group_of(self, session_id: str) -> Optional[int]:
        """The group a turn of this session runs in (None: unknown here, the tokenizer picks)."""
        return self.groups.get(session_id)

    def open(self, control: Control, capacity_of_str_len: Any, session_id: Optional[str], streaming: bool,
             timeout: Optional[float]) -> Optional[str]:
        """``Engine.open_session``: check the arguments, place the session, open it there."""
        if not isinstance(capacity_of_str_len, int) or capacity_of_str_len < 0:
            raise ValueError(f"capacity_of_str_len must be a non-negative int, got {capacity_of_str_len!r}.")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}.")
        if streaming and not self.streaming_enabled:
            raise ValueError("Streaming sessions are disabled. Please relaunch with --enable-streaming-session.")
        sid = session_id or uuid.uuid4().hex
        self._forget_expired(control)
        # A session lives in one DP group (its KV stays cached there): the one holding the fewest;
        # an id seen before asks its own group (which says no while it is open there).
        g = self.groups.get(sid)
        if g is None or g not in control.live_groups():
            g = min(control.live_groups(), key=lambda r: (list(self.groups.values()).count(r), r))
        if not control.open_session(g, sid, timeout, bool(streaming)):
            return None
        self.groups[sid] = g
        if timeout is not None:
            self.timed.add(sid)
        return sid

    def close(self, control: Control, session_id: str) -> None:
        """``Engine.close_session``: ask the session's group (every group for an unknown id)."""
        self.timed.discard(session_id)
        g = self.groups.pop(session_id, None)
        if g is None or g in control.live_groups():
            control.close_session(session_id, None if g is None else [g])

    def _forget_expired(self, control: Control) -> None:
        """Drop the sessions that their scheduler closed on timeout from the session -> group map
        (asks the groups, only while such sessions are tracked): otherwise they would count
        against their group when new sessions are placed, and the map would grow for ever."""
        if not self.timed:
            return
        open_ids = control.open_session_ids()
        for sid in self.timed - open_ids:
            self.groups.pop(sid, None)
        self.timed &= open_ids


def session_params(d: Any) -> SessionParams:
    """SGLang's ``session_params`` dict (``id`` or ``session_id``, ``rid``, ``offset``, ``replace``,
    ``drop_previous_output``)."""
    if not isinstance(d, dict):
        raise TypeError("session_params must be a dict.")
    d = dict(d)
    if "session_id" in d:
        d.setdefault("id", d.pop("session_id"))
    try:
        return msgspec.convert(d, SessionParams)
    except msgspec.ValidationError as e:
        raise ValueError(f"Invalid session_params: {e}") from None
