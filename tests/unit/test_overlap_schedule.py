"""Overlap scheduling: step N+1 is planned before step N's result is applied.

A fake worker keeps a simulated KV cache (the token at each location) and a req-to-token table,
fills placeholder inputs from the token it sampled last for the slot, and "samples" a token that
is a hash of the whole sequence read back through the table. So any slip in positions, locations,
placeholders, retraction or prefix reuse changes the outputs: they must equal the outputs of the
same requests run one step at a time.
"""

from __future__ import annotations

import collections
import random
from typing import Optional

import pytest

from treadle.runtime.messages import PLACEHOLDER, ForwardPlan
from test_scheduler import EOS, make_sched, treq


class FakeWorker:
    def __init__(self, max_slots: int, kv_tokens: int) -> None:
        self.kv = [None] * kv_tokens
        self.table = [dict() for _ in range(max_slots)]
        self.last = [None] * max_slots

    @staticmethod
    def next_token(seq: list[int]) -> int:
        h = sum((i + 1) * t * 31 for i, t in enumerate(seq)) % 101
        return EOS if h < 3 else h % 25 + 1

    def run(self, plan: ForwardPlan) -> list[int]:
        for pw in plan.prefix_writes:
            for pos, loc in enumerate(pw.locs):
                self.table[pw.slot][pos] = loc
        out = []
        for row in plan.rows:
            for k, (tok, loc) in enumerate(zip(row.input_ids, row.new_locs)):
                if tok == PLACEHOLDER:
                    assert len(row.input_ids) == 1 and self.last[row.slot] is not None
                    tok = self.last[row.slot]
                self.table[row.slot][row.start_pos + k] = loc
                self.kv[loc] = tok
            if row.sample:
                end = row.start_pos + len(row.input_ids)
                seq = [self.kv[self.table[row.slot][p]] for p in range(end)]
                assert None not in seq
                self.last[row.slot] = self.next_token(seq)
                out.append(self.last[row.slot])
        return out


def run(reqs_at: dict[int, list], depth: int, disjoint: bool = False, stats: Optional[dict] = None,
        **sched_kw) -> dict[str, list[int]]:
    """Drive a scheduler with ``depth`` steps in flight; requests join at the given step numbers.
    ``disjoint``: steps in flight must not share a request (pipeline micro-batches)."""
    s = make_sched(**sched_kw)
    flying: collections.deque = collections.deque()  # slots of each step in flight
    overlapped = 0
    w = FakeWorker(s.max_running, s.max_total_tokens)
    inflight: collections.deque = collections.deque()
    outs: dict[str, list[int]] = collections.defaultdict(list)
    finished: set[str] = set()
    for i in range(10_000):
        s.add_requests(reqs_at.get(i, []))
        plan = s.schedule() if len(inflight) < depth else None
        if plan is not None:
            slots = {row.slot for row in plan.rows}
            if disjoint:
                assert all(PLACEHOLDER not in row.input_ids for row in plan.rows)
                assert not any(slots & other for other in flying), "a request is in two micro-batches"
            overlapped += bool(inflight)
            flying.append(slots)
            inflight.append(w.run(plan))
        if inflight and (plan is None or len(inflight) >= depth):
            s.apply_result(inflight.popleft())
            flying.popleft()
        for o in s.take_outputs():
            assert o.rid not in finished
            outs[o.rid] += o.new_ids
            if o.finish is not None:
                finished.add(o.rid)
        if plan is None and not inflight and s.is_idle() and i > max(reqs_at, default=0):
            break
    assert s.is_idle()
    s.check_integrity()
    assert finished == {r.rid for rs in reqs_at.values() for r in rs}
    if stats is not None:
        stats["overlapped"] = overlapped
    return dict(outs)


def random_requests(seed: int, n: int, shared_prefix: bool = False) -> dict[int, list]:
    rng = random.Random(seed)
    at: dict[int, list] = collections.defaultdict(list)
    prefix = [rng.randint(1, 25) for _ in range(12)]
    for i in range(n):
        r = treq(f"r{i}", n_prompt=rng.randint(1, 40), max_new_tokens=rng.randint(1, 24),
                 ignore_eos=rng.random() < 0.3, stream=rng.random() < 0.5)
        if shared_prefix and rng.random() < 0.6:
            r.input_ids = prefix + r.input_ids[: rng.randint(1, 8)]
        at[rng.randint(0, 60)].append(r)
    return dict(at)


@pytest.mark.parametrize("kw", [
    dict(),
    dict(kv_tokens=80, max_slots=4, schedule_conservativeness=0.1),  # tight memory: ~11 retractions
    dict(radix=True, page_size=1),  # prefix reuse
    dict(radix=True, page_size=4, chunk=8, max_prefill_tokens=16),  # chunked prefill
])
def test_overlap_gives_the_same_outputs(kw):
    reqs = random_requests(1, 40, shared_prefix=kw.get("radix", False))
    want = run(reqs, depth=1, **kw)
    got = run(reqs, depth=2, **kw)
    assert got == want


@pytest.mark.parametrize("kw", [dict(), dict(kv_tokens=80, max_slots=4, schedule_conservativeness=0.1),
                                dict(radix=True, page_size=4, chunk=8, max_prefill_tokens=16)])
def test_pipeline_micro_batches_are_disjoint_and_give_the_same_outputs(kw):
    """pp_size=2: two steps in flight over disjoint requests, no placeholders, same outputs."""
    reqs = random_requests(2, 30, shared_prefix=kw.get("radix", False))
    want = run(reqs, depth=1, **kw)
    stats: dict = {}
    got = run(reqs, depth=2, disjoint=True, stats=stats, pp_size=2, **kw)
    assert got == want
    assert stats["overlapped"] > 10  # steps sent while another micro-batch was in flight


def test_decode_rows_use_placeholders_and_never_pass_max_new_tokens():
    s = make_sched()
    w = FakeWorker(s.max_running, s.max_total_tokens)
    s.add_requests([treq("a", max_new_tokens=3, ignore_eos=True)])
    p1 = s.schedule()  # prefill, samples token 1
    r1 = w.run(p1)
    p2 = s.schedule()  # decode of token 1 before it is known
    assert p2.rows[0].input_ids == [PLACEHOLDER] and p2.rows[0].start_pos == 6
    s.apply_result(r1)
    r2 = w.run(p2)
    p3 = s.schedule()  # token 3 is the last one: no fourth decode is planned behind it
    r3 = w.run(p3)
    s.apply_result(r2)
    assert s.schedule() is None
    s.apply_result(r3)
    out = s.take_outputs()
    assert out[-1].finish.type == "length" and sum(len(o.new_ids) for o in out) == 3
    assert s.is_idle()
    s.check_integrity()


def test_abort_in_flight_answers_at_once_and_frees_after_the_step():
    s = make_sched()
    w = FakeWorker(s.max_running, s.max_total_tokens)
    s.add_requests([treq("a", max_new_tokens=30)])
    r1 = w.run(s.schedule())
    s.abort("a", abort_all=False)
    assert [o.finish.type for o in s.take_outputs()] == ["abort"]
    assert not s.is_idle()  # its slot and KV stay until the step in flight is done
    s.apply_result(r1)
    assert s.is_idle() and s.take_outputs() == []
    s.check_integrity()


def test_an_embedding_in_flight_is_not_planned_again():
    s = make_sched()
    r = treq("e")
    r.embed = True
    s.add_requests([r])
    plan = s.schedule()
    assert [row.sample for row in plan.rows] == [False]
    assert s.schedule() is None  # nothing to decode behind it: the loop waits for its result


def test_a_token_dropped_under_a_step_in_flight_never_reaches_the_cache():
    """Request fails on step N's result (the worker reports an error) while step N+1, which
    computed the KV of N's token, is in flight: only known tokens' KV goes into the prefix cache."""
    from treadle.runtime.messages import RowOut

    s = make_sched(radix=True, page_size=1)
    w = FakeWorker(s.max_running, s.max_total_tokens)
    s.add_requests([treq("a", max_new_tokens=30, ignore_eos=True)])
    r1 = w.run(s.schedule())
    s.apply_result(r1)
    r2 = w.run(s.schedule())
    r3 = w.run(s.schedule())  # decodes step 2's token, still unknown here
    s.apply_result(r2, extras={0: RowOut(error="boom")})
    assert s.take_errors() == [("a", "runtime", "boom")] and s.take_outputs() == []
    s.apply_result(r3)
    assert s.is_idle()
    s.check_integrity()
    s.cache.check()
