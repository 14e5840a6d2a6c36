"""The scheduler's session table (``scheduler_proc/sessions.py``): contexts, timeouts, streaming; and
the prefix-cache locks ``Sessions`` keeps for each session's latest turn."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from treadle.runtime.messages import FinishReason, GenerateReq, SessionParams, TokenizedReq, WorkerInfo
from treadle.runtime.sampling_params import SamplingParams
from treadle.runtime.server_args import ServerArgs
from treadle.scheduler_proc.kv_pool import PageAllocator
from treadle.scheduler_proc.radix_cache import RadixCache
from treadle.scheduler_proc.req import Req
from treadle.scheduler_proc.scheduler import Scheduler
from treadle.scheduler_proc.sessions import Sessions, SessionTable
from treadle.tokenizer_proc.validate import check_logprob_args


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


def test_a_turn_counts_as_finished_once_its_result_is_out():
    """The next turn may arrive between a turn's result and its release (a step still in flight):
    its context has the finished turn already, and the release's second ``finish`` does not take
    ``latest`` back from a turn that finished in between (the full suite once sent a turn whose
    context was empty: its parent was only recorded at the release)."""
    t = SessionTable()
    t.open("s")
    start(t, SessionParams(id="s"), "r1", [1, 2])
    t.finish("s", "r1", [9])  # the result went out
    assert start(t, SessionParams(id="s"), "r2", [3]) == [1, 2, 9, 3]
    t.finish("s", "r2", [8])
    t.finish("s", "r1", [9])  # r1's release comes after r2 finished
    assert start(t, SessionParams(id="s"), "r3", [4]) == [1, 2, 9, 3, 8, 4]


def test_scheduler_records_a_turn_when_its_result_goes_out():
    s = _scheduler()
    assert s.sessions.open("s")
    req = SimpleNamespace(finish_sent=True, rid="a", output_ids=[7], tokenized=SimpleNamespace(
        session=SessionParams(id="s")), token_out=lambda metrics: "out")
    s.sessions.table.begin(SessionParams(id="s"), "a", [1, 2], [])
    s.outputs.emit(req)
    assert s.sessions.sessions["s"].latest == "a" and s.sessions.table.context(
        SessionParams(id="s"), "b", [3])[0] == [1, 2, 7, 3]


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


def test_replace_from_a_turn_deletes_the_turns_after_it():
    """SGLang's tree: ``replace=True`` with ``rid`` branches at that turn and deletes its
    descendants (a later turn naming one is refused); the unfinished ones are returned to abort."""
    t = SessionTable()
    t.open("s")
    start(t, SessionParams(id="s"), "a", [1])
    t.finish("s", "a", [2])
    start(t, SessionParams(id="s"), "b", [3])
    t.finish("s", "b", [4])
    start(t, SessionParams(id="s", rid="a"), "c", [5])  # a second branch from "a"
    t.finish("s", "c", [6])
    start(t, SessionParams(id="s", rid="b"), "d", [7])  # still running
    start(t, SessionParams(id="s"), "x", [9])  # an unrelated fresh-from-latest turn ("c"), still running
    sp = SessionParams(id="s", rid="b", replace=True)
    ids, items = t.context(sp, "e", [8])
    assert ids == [1, 2, 3, 4, 8]
    assert t.begin(sp, "e", ids, items) == ["d"]  # "d" ran after "b": deleted, and running
    assert sorted(t.sessions["s"].turns) == ["a", "b", "c", "e", "x"]
    sp = SessionParams(id="s", rid="a", replace=True)
    ids, items = t.context(sp, "f", [0])
    assert ids == [1, 2, 0]
    assert sorted(t.begin(sp, "f", ids, items)) == ["e", "x"]  # "b" and "c" had finished
    assert sorted(t.sessions["s"].turns) == ["a", "f"] and t.sessions["s"].latest == "a"
    for gone in ("b", "c", "d", "e"):
        with pytest.raises(ValueError, match=f"Invalid request session id: rid {gone} is not a turn of session s"):
            t.context(SessionParams(id="s", rid=gone), "g", [1])
    assert t.finish("s", "e", [5]) is None  # a deleted turn's end changes nothing
    t.finish("s", "f", [3])
    assert start(t, SessionParams(id="s"), "g", [4]) == [1, 2, 0, 3, 4]
    sp = SessionParams(id="s", replace=True)  # without rid: a fresh start, every turn deleted
    ids, items = t.context(sp, "h", [6])
    assert ids == [6] and t.begin(sp, "h", ids, items) == ["g"]
    assert list(t.sessions["s"].turns) == ["h"] and t.sessions["s"].latest is None


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


def _scheduler() -> Scheduler:
    args = ServerArgs(device="cpu", random_seed=0, page_size=1, chunked_prefill_size=-1).resolved()
    tok = SimpleNamespace(decode=lambda ids, skip_special_tokens=False: "x" * len(ids))
    return Scheduler(args, tok, {0}, WorkerInfo(context_len=256, kv_tokens=512, max_slots=4, vocab_size=100))


def _run(s: Scheduler, steps: int) -> None:
    for _ in range(steps):
        plan = s.schedule()
        if plan is None:
            return
        s.apply_result([7] * sum(r.sample for r in plan.rows))


def test_scheduler_aborts_deleted_turns_and_counts_logprob_start_len_in_the_whole_context():
    s = _scheduler()
    assert s.sessions.open("s")

    def turn(name: str, new_ids: list[int], max_new: int, **kw) -> list[tuple[str, str, str]]:
        sp = SessionParams(id="s", **{k: kw.pop(k) for k in ("rid", "replace") if k in kw})
        return s.add_requests([TokenizedReq(rid=name, input_ids=new_ids, session=sp,
                                            sampling=SamplingParams(max_new_tokens=max_new, ignore_eos=True), **kw)])

    assert turn("a", [1, 2, 3], 2) == []
    _run(s, 10)
    s.take_outputs()
    # the context is a's 3 + 2 tokens plus 2 new ones: position 6 is the new text's second token
    assert turn("b", [4, 5], 20, return_logprob=True, logprob_start_len=6) == []
    assert turn("late", [4], 5, return_logprob=True, logprob_start_len=8) == [
        ("late", "value", "logprob_start_len (8) is larger than the prompt length (6: the session turn's whole "
                          "context, earlier turns included).")]
    _run(s, 3)
    assert [r.rid for r in s.running] == ["b"]
    s.take_outputs()
    assert turn("c", [9], 2, rid="a", replace=True) == []  # branches at "a": "b" (running) is deleted
    (out,) = s.take_outputs()
    assert out.rid == "b" and out.finish == FinishReason(
        type="abort", message="Aborted: a replace=True turn of session s deleted this turn")
    _run(s, 10)
    assert s.is_idle() and sorted(s.sessions.sessions["s"].turns) == ["a", "c"]
    (err,) = turn("d", [1], 2, rid="b")
    assert err[:2] == ("d", "value") and err[2].startswith("Invalid request session id: rid b is not a turn")
    assert s.sessions.close("s")
    s.check_integrity()


def test_tokenizer_leaves_a_turns_logprob_start_len_bound_to_the_scheduler():
    """The tokenizer sees only a turn's new text; the bound against the whole context is the
    scheduler's (above). Other checks, and a plain request's bound, stay in the tokenizer."""
    def req(**kw) -> GenerateReq:
        return GenerateReq(rid="r", input_ids=[1, 2], return_logprob=True, **kw)

    check_logprob_args(req(logprob_start_len=40, session=SessionParams(id="s")), 2, 100)
    with pytest.raises(ValueError, match=r"logprob_start_len \(40\) is larger than the prompt length \(2\)"):
        check_logprob_args(req(logprob_start_len=40), 2, 100)
    with pytest.raises(ValueError, match="must be -1"):
        check_logprob_args(req(logprob_start_len=-2, session=SessionParams(id="s")), 2, 100)
