"""The scheduler's session table (``scheduler_proc/sessions.py``): contexts, timeouts, streaming; and
the prefix-cache locks ``Sessions`` keeps for each session's latest turn."""

from __future__ import annotations

import pytest

from treadle.runtime.messages import SessionParams, TokenizedReq
from treadle.runtime.sampling_params import SamplingParams
from treadle.scheduler_proc.kv_pool import PageAllocator
from treadle.scheduler_proc.radix_cache import RadixCache
from treadle.scheduler_proc.req import Req
from treadle.scheduler_proc.sessions import Sessions, SessionTable


def start(t: SessionTable, sp: SessionParams, rid: str, new_ids: list[int]) -> list[int]:
    """A turn the scheduler accepts: its context, then ``begin``."""
    ids, items = t.context(sp, rid, new_ids)
    t.begin(sp, rid, ids, items)
    return ids


def test_turns_continue_from_the_latest_or_a_named_parent():
    t = SessionTable()
    assert t.open("s") and not t.open("s")
    assert start(t, SessionParams(id="s"), "r1", [1, 2]) == [1, 2]
    with pytest.raises(ValueError, match="hasn't finished"):
        t.context(SessionParams(id="s", rid="r1"), "r2", [3])
    t.finish("s", "r1", [9])
    assert start(t, SessionParams(id="s"), "r2", [3]) == [1, 2, 9, 3]
    t.finish("s", "r2", [8])
    assert start(t, SessionParams(id="s", rid="r1", drop_previous_output=True), "r3", [4]) == [1, 2, 4]
    with pytest.raises(ValueError, match="does not exist"):
        t.context(SessionParams(id="nope"), "r4", [1])


def test_a_turn_joins_only_once_accepted():
    """``context`` alone (a request the scheduler then refuses) changes nothing; ``replace`` clears
    the session only when its turn is accepted; a turn that failed in the queue can be dropped."""
    t = SessionTable()
    t.open("s", streaming=True)
    t.context(SessionParams(id="s"), "refused", [1])
    assert start(t, SessionParams(id="s"), "r1", [1]) == [1]  # not "already has an active request"
    t.drop("s", "r1")
    assert start(t, SessionParams(id="s"), "r2", [2]) == [2]
    t.finish("s", "r2", [3])
    t2 = SessionTable()
    t2.open("s")
    start(t2, SessionParams(id="s"), "a", [1])
    t2.finish("s", "a", [2])
    t2.context(SessionParams(id="s", replace=True), "refused", [7])
    assert t2.sessions["s"].latest == "a" and "a" in t2.sessions["s"].turns
    assert start(t2, SessionParams(id="s", replace=True), "b", [7]) == [7]
    assert list(t2.sessions["s"].turns) == ["b"] and t2.sessions["s"].latest is None


def test_timeout_counts_from_the_last_turn_and_spares_running_ones():
    t = SessionTable()
    t.open("idle", timeout=5.0)
    t.open("busy", timeout=5.0)
    t.open("forever")
    start(t, SessionParams(id="busy"), "r1", [1])
    now = t.sessions["idle"].last_active
    assert t.expired(now + 1) == []
    assert t.expired(now + 10) == ["idle"]  # "busy" has a running turn, "forever" no timeout
    t.finish("busy", "r1", [2])
    later = t.sessions["busy"].last_active
    assert sorted(t.expired(later + 10)) == ["busy", "idle"] and t.expired(later + 1) == []


def test_streaming_session_is_one_chain():
    t = SessionTable()
    t.open("s", streaming=True)
    start(t, SessionParams(id="s"), "r1", [1])
    with pytest.raises(ValueError, match="already has an active request"):
        t.context(SessionParams(id="s"), "r2", [2])
    assert t.close("s") is None and t.sessions["s"].closing  # deferred while r1 runs
    with pytest.raises(ValueError, match="close was requested"):
        t.context(SessionParams(id="s"), "r2", [2])
    assert t.finish("s", "r1", [5]).closing
    t2 = SessionTable()
    t2.open("s", streaming=True)
    start(t2, SessionParams(id="s"), "a", [1])
    t2.finish("s", "a", [2])
    start(t2, SessionParams(id="s"), "b", [3])
    t2.finish("s", "b", [4])
    for sp, msg in ((SessionParams(id="s", offset=1), "offset"), (SessionParams(id="s", replace=True), "replace"),
                    (SessionParams(id="s", rid="a"), "latest turn")):
        with pytest.raises(ValueError, match=msg):
            t2.context(sp, "c", [5])
    assert start(t2, SessionParams(id="s", rid="b"), "c", [5]) == [1, 2, 3, 4, 5]


def test_sessions_keep_the_latest_turn_locked_in_the_prefix_cache():
    """``Sessions``, the scheduler's half: a finished turn's KV stays locked (the next turn finds
    it), a later turn moves the lock, and closing or flushing unlocks it."""
    alloc = PageAllocator(64, 1)
    cache = RadixCache(1, alloc)
    sessions = Sessions(cache)
    assert sessions.open("s") and not sessions.open("s")

    def turn(rid: str, sp: SessionParams, new_ids: list[int], out: list[int]) -> None:
        ids, items = sessions.table.context(sp, rid, new_ids)
        sessions.table.begin(sp, rid, ids, items)
        req = Req(TokenizedReq(rid=rid, input_ids=ids, sampling=SamplingParams(), session=sp), 8, set())
        req.output_ids = out
        cache.insert(req.all_ids(), alloc.alloc(len(req.all_ids())))  # the request's release cached its KV
        sessions.turn_done(req)

    turn("r1", SessionParams(id="s"), [1, 2], [3])
    assert cache.locked_pages == 3 and sessions.sessions["s"].latest == "r1"
    turn("r2", SessionParams(id="s"), [4], [5])
    assert cache.locked_pages == 5  # r2's path (r1's prefix included) only
    sessions.unlock_all()
    assert cache.locked_pages == 0 and sessions.sessions["s"].lock_node is None
    turn("r3", SessionParams(id="s"), [6], [])
    assert cache.locked_pages == 6
    assert sessions.close("s") and not sessions.close("s")
    assert cache.locked_pages == 0 and "s" not in sessions.sessions
    cache.check()
