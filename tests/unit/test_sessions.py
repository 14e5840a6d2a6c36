"""The scheduler's session table (``scheduler_proc/sessions.py``): contexts, timeouts, streaming."""

from __future__ import annotations

import pytest

from treadle.runtime.messages import SessionParams
from treadle.scheduler_proc.sessions import SessionTable


def test_turns_continue_from_the_latest_or_a_named_parent():
    t = SessionTable()
    assert t.open("s") and not t.open("s")
    assert t.context(SessionParams(id="s"), "r1", [1, 2])[0] == [1, 2]
    with pytest.raises(ValueError, match="hasn't finished"):
        t.context(SessionParams(id="s", rid="r1"), "r2", [3])
    t.finish("s", "r1", [9])
    assert t.context(SessionParams(id="s"), "r2", [3])[0] == [1, 2, 9, 3]
    t.finish("s", "r2", [8])
    assert t.context(SessionParams(id="s", rid="r1", drop_previous_output=True), "r3", [4])[0] == [1, 2, 4]
    with pytest.raises(ValueError, match="does not exist"):
        t.context(SessionParams(id="nope"), "r4", [1])


def test_timeout_counts_from_the_last_turn_and_spares_running_ones():
    t = SessionTable()
    t.open("idle", timeout=5.0)
    t.open("busy", timeout=5.0)
    t.open("forever")
    t.context(SessionParams(id="busy"), "r1", [1])
    now = t.sessions["idle"].last_active
    assert t.expired(now + 1) == []
    assert t.expired(now + 10) == ["idle"]  # "busy" has a running turn, "forever" no timeout
    t.finish("busy", "r1", [2])
    later = t.sessions["busy"].last_active
    assert sorted(t.expired(later + 10)) == ["busy", "idle"] and t.expired(later + 1) == []


def test_streaming_session_is_one_chain():
    t = SessionTable()
    t.open("s", streaming=True)
    t.context(SessionParams(id="s"), "r1", [1])
    with pytest.raises(ValueError, match="already has an active request"):
        t.context(SessionParams(id="s"), "r2", [2])
    assert t.close("s") is None and t.sessions["s"].closing  # deferred while r1 runs
    with pytest.raises(ValueError, match="close was requested"):
        t.context(SessionParams(id="s"), "r2", [2])
    assert t.finish("s", "r1", [5]).closing
    t2 = SessionTable()
    t2.open("s", streaming=True)
    t2.context(SessionParams(id="s"), "a", [1])
    t2.finish("s", "a", [2])
    t2.context(SessionParams(id="s"), "b", [3])
    t2.finish("s", "b", [4])
    for sp, msg in ((SessionParams(id="s", offset=1), "offset"), (SessionParams(id="s", replace=True), "replace"),
                    (SessionParams(id="s", rid="a"), "latest turn")):
        with pytest.raises(ValueError, match=msg):
            t2.context(sp, "c", [5])
    assert t2.context(SessionParams(id="s", rid="b"), "c", [5])[0] == [1, 2, 3, 4, 5]
