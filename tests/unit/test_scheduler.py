"""The scheduler core driven by hand (no processes): KV/slot accounting, finish rules, continuous
batching, aborts and the TokenOut stream, with a fake one-char-per-id tokenizer."""

from __future__ import annotations

import pytest

from treadle.runtime.messages import FinishReason, ForwardPlan, TokenizedReq, TokenOut, WorkerInfo
from treadle.runtime.sampling_params import SamplingParams
from treadle.runtime.server_args import ServerArgs
from treadle.scheduler_proc.kv_pool import PageAllocator, SlotAllocator
from treadle.scheduler_proc.req import DETOKENIZE_CONTEXT, Req
from treadle.scheduler_proc.scheduler import Scheduler
from treadle.scheduler_proc.stop_checker import check_finish

EOS = 0
ALPHA = "abcdefghijklmnopqrstuvwxyz"


class FakeTokenizer:
    """id i <-> ALPHA[i] (ids >= 26 decode to '#')."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(ALPHA[i] if 0 <= i < 26 else "#" for i in ids)


def ids_of(s: str) -> list[int]:
    return [ALPHA.index(c) for c in s]


TOK = FakeTokenizer()
_ARGS_CACHE: dict = {}


def make_args(**kw) -> ServerArgs:
    key = tuple(sorted(kw.items()))
    if key not in _ARGS_CACHE:
        _ARGS_CACHE[key] = ServerArgs(device="cpu", random_seed=0, **kw).resolved()
    return _ARGS_CACHE[key]


def make_sched(page_size=4, max_prefill_tokens=16384, stream_interval=1, context_len=256, kv_tokens=512,
               max_slots=4, eos_ids=frozenset({EOS}), radix=False, chunk=-1, **kw) -> Scheduler:
    """Defaults to no prefix cache and no chunking, so plans are easy to predict; tests of those
    features turn them on."""
    args = make_args(page_size=page_size, max_prefill_tokens=max_prefill_tokens, stream_interval=stream_interval,
                     disable_radix_cache=not radix, chunked_prefill_size=chunk, **kw)
    return Scheduler(args, TOK, set(eos_ids), WorkerInfo(context_len=context_len, kv_tokens=kv_tokens,
                                                          max_slots=max_slots, vocab_size=1 << 62))


def treq(rid: str, n_prompt: int = 6, stream: bool = False, **sampling) -> TokenizedReq:
    ids = [(i % 24) + 1 for i in range(n_prompt)]  # never EOS
    return TokenizedReq(rid=rid, input_ids=ids, sampling=SamplingParams(**sampling), stream=stream)


class Driver:
    """Runs steps and records plans, checking page/slot consistency of every plan."""

    def __init__(self, s: Scheduler) -> None:
        self.s = s
        self.plans: list[ForwardPlan] = []
        self.outs: list[TokenOut] = []
        self.slot_locs: dict[int, dict[int, int]] = {}  # slot -> position -> loc, for the live owner

    def step(self, tokens=None, token=5) -> ForwardPlan | None:
        s = self.s
        plan = s.schedule()
        if plan is None:
            return None
        self.check_plan(plan)
        self.plans.append(plan)
        n = sum(r.sample for r in plan.rows)
        s.apply_result(list(tokens) if tokens is not None else [token] * n)
        self.outs += s.take_outputs()
        return plan

    def run(self, max_steps=1000, **kw) -> None:
        for _ in range(max_steps):
            if self.step(**kw) is None:
                break
        assert self.s.is_idle()
        self.s.check_integrity()

    def check_plan(self, plan: ForwardPlan) -> None:
        s, ps = self.s, self.s.page_size
        reqs = [b.req for b in s.plan_rows]
        assert len(plan.rows) == len(reqs) <= s.max_running
        assert len({r.slot for r in plan.rows}) == len(plan.rows)
        for slot in (ns.slot for ns in plan.new_slots):
            self.slot_locs[slot] = {}
        for pw in plan.prefix_writes:  # a prefix-cache hit: positions 0.. already hold KV
            self.slot_locs[pw.slot] = dict(enumerate(pw.locs))
        for row, req in zip(plan.rows, reqs):
            assert row.slot == req.slot
            assert len(row.new_locs) == len(row.input_ids)
            pages = set(req.pages)
            assert len(req.pages) >= s.pages.pages_for(row.start_pos + len(row.input_ids))
            for k, loc in enumerate(row.new_locs):
                pos = row.start_pos + k
                assert loc // ps == req.pages[pos // ps], "location outside the page for this position"
                assert loc % ps == pos % ps, "offset inside the page must follow the position"
                assert loc // ps in pages
                assert pos not in self.slot_locs[row.slot]
                self.slot_locs[row.slot][pos] = loc
            # positions are contiguous per slot: prefill from 0, then one per decode step
            assert sorted(self.slot_locs[row.slot]) == list(range(row.start_pos + len(row.input_ids)))
        # pages a request owns (past its cached prefix) belong to it alone
        owned = [p for r in s.running for p in r.pages[r.shared_pages:]]
        assert len(owned) == len(set(owned))
        cached = s.cache.cached_pages if s.cache is not None else 0
        assert s.pages.free_pages + len(owned) + cached == s.pages.num_pages
        assert s.slots.free_slots + len(s.running) == s.slots.num_slots

    def by_rid(self, rid: str) -> list[TokenOut]:
        return [o for o in self.outs if o.rid == rid]


# ------------------------------------------------------------------ kv_pool
def test_page_allocator_accounting():
    pa = PageAllocator(num_tokens=10, page_size=4)
    assert pa.num_pages == 2 and pa.free_pages == 2  # a partial page is not usable
    assert [pa.pages_for(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    a = pa.alloc(1)
    assert len(a) == 1 and pa.free_pages == 1
    with pytest.raises(MemoryError, match="2 KV pages, 1 free"):
        pa.alloc(2)
    assert pa.free_pages == 1  # a failed alloc takes nothing
    b = pa.alloc(1)
    assert set(a + b) == {0, 1}
    assert pa.alloc(0) == []
    pa.free(a + b)
    assert pa.free_pages == 2
    assert sorted(pa.alloc(2)) == [0, 1]


def test_page_allocator_page_size_one():
    pa = PageAllocator(num_tokens=7, page_size=1)
    assert pa.num_pages == 7 and pa.pages_for(7) == 7
    assert len(set(pa.alloc(7))) == 7 and pa.free_pages == 0
    with pytest.raises(MemoryError):
        pa.alloc(1)


def test_slot_allocator():
    sa = SlotAllocator(3)
    got = [sa.alloc() for _ in range(3)]
    assert sorted(got) == [0, 1, 2] and sa.free_slots == 0
    with pytest.raises(IndexError):
        sa.alloc()
    sa.free(got[1])
    assert sa.free_slots == 1 and sa.alloc() == got[1]


# ------------------------------------------------------------------ stop_checker
def make_req(max_new=10, eos=frozenset({EOS}), **sampling) -> Req:
    return Req(TokenizedReq(rid="r", input_ids=[1, 2, 3], sampling=SamplingParams(**sampling)), max_new, set(eos))


def feed(req: Req, toks) -> None:
    for t in toks:
        req.output_ids.append(t)
        check_finish(req, TOK)
        if req.finish is not None:
            return


def test_finish_length():
    r = make_req(max_new=3)
    feed(r, [5, 5, 5, 5])
    assert r.finish == FinishReason(type="length", length=3) and len(r.output_ids) == 3


def test_length_before_stop_string_and_token():
    r = make_req(max_new=2, stop="c")
    feed(r, [5, ALPHA.index("c")])
    assert r.finish.type == "length"
    r = make_req(max_new=2)
    feed(r, [5, EOS])
    assert r.finish == FinishReason(type="length", length=2)


def test_stop_string_before_stop_token():
    # EOS (id 0) decodes to "a": a stop string "a" is matched as a string, not as the token
    r = make_req(stop=["zz", "a"])
    feed(r, [5, EOS])
    assert r.finish == FinishReason(type="stop", matched="a")


def test_stop_string_across_tokens():
    r = make_req(stop="cde")
    feed(r, ids_of("xcd"))
    assert r.finish is None
    feed(r, ids_of("e"))
    assert r.finish == FinishReason(type="stop", matched="cde")


def test_first_listed_stop_string_wins():
    r = make_req(stop=["c", "bc"])
    feed(r, ids_of("zbc"))
    assert r.finish.matched == "c"


def test_stop_tokens():
    r = make_req()
    feed(r, [5, EOS])
    assert r.finish == FinishReason(type="stop", matched=EOS)
    r = make_req(stop_token_ids=[7])
    feed(r, [5, 7])
    assert r.finish == FinishReason(type="stop", matched=7)
    r = make_req(eos=frozenset({EOS, 9}))
    feed(r, [9])
    assert r.finish.matched == 9


def test_ignore_eos_disables_all_stop_tokens_but_not_strings():
    r = make_req(max_new=4, ignore_eos=True, stop_token_ids=[7])
    feed(r, [EOS, 7, EOS, 7])
    assert r.finish == FinishReason(type="length", length=4)
    r = make_req(ignore_eos=True, stop="h")
    feed(r, [EOS, ALPHA.index("h")])
    assert r.finish == FinishReason(type="stop", matched="h")


def test_check_finish_keeps_existing_reason():
    r = make_req(max_new=1)
    r.finish = FinishReason(type="abort", message="Aborted")
    r.output_ids.append(EOS)
    check_finish(r, TOK)
    assert r.finish.type == "abort"


# ------------------------------------------------------------------ scheduler: basics
def test_single_request_lifecycle():
    s = make_sched()
    d = Driver(s)
    assert s.add_requests([treq("a", n_prompt=6, max_new_tokens=4)]) == []
    assert not s.is_idle() and len(s.waiting) == 1
    p1 = d.step()
    assert [ns.slot for ns in p1.new_slots] == [p1.rows[0].slot]
    assert p1.rows[0].start_pos == 0 and len(p1.rows[0].input_ids) == 6 and p1.rows[0].sample
    assert p1.step == 1
    p2 = d.step(token=7)
    assert p2.new_slots == [] and p2.rows[0].input_ids == [5] and p2.rows[0].start_pos == 6
    d.run(token=8)
    assert [p.step for p in d.plans] == [1, 2, 3, 4]
    outs = d.by_rid("a")
    assert len(outs) == 1
    o = outs[0]
    assert o.new_ids == [5, 7, 8, 8] and o.finish == FinishReason(type="length", length=4)
    assert o.prompt_tokens == 6 and o.completion_tokens == 4 and o.cached_tokens == 0
    assert s.schedule() is None


def test_sampling_spec_in_new_slot():
    s = make_sched()
    d = Driver(s)
    s.add_requests([treq("g", temperature=0.0, top_k=50, max_new_tokens=1),
                    treq("t", temperature=0.7, top_p=0.9, top_k=5, min_p=0.1, sampling_seed=3, max_new_tokens=1)])
    p = d.step()
    g, t = (ns.sampling for ns in p.new_slots)
    assert (g.temperature, g.top_k) == (0.0, 1)
    assert (t.temperature, t.top_p, t.top_k, t.min_p, t.seed) == (0.7, 0.9, 5, 0.1, 3)


@pytest.mark.parametrize("page_size", [1, 3, 4, 16])
def test_continuous_batching_and_page_consistency(page_size):
    s = make_sched(page_size=page_size)
    d = Driver(s)
    s.add_requests([treq("a", n_prompt=5, max_new_tokens=6)])
    d.step()
    d.step()
    s.add_requests([treq("b", n_prompt=9, max_new_tokens=3)])
    p = d.step()
    # a decodes while b prefills, in one plan
    assert len(p.rows) == 2
    assert [len(r.input_ids) for r in p.rows] == [1, 9]
    assert len(p.new_slots) == 1 and p.new_slots[0].slot == p.rows[1].slot
    s.add_requests([treq("c", n_prompt=2, max_new_tokens=2)])
    p = d.step()
    assert [len(r.input_ids) for r in p.rows] == [1, 1, 2]
    d.run()
    assert {o.rid: len(o.new_ids) for o in d.outs} == {"a": 6, "b": 3, "c": 2}
    assert s.pages.free_pages == s.pages.num_pages == 512 // page_size  # no prefix cache here


def test_slots_cap_running_set():
    s = make_sched(max_slots=2)
    d = Driver(s)
    s.add_requests([treq(f"r{i}", max_new_tokens=3) for i in range(5)])
    p = d.step()
    assert len(p.rows) == 2 and len(s.running) == 2 and len(s.waiting) == 3
    while d.step() is not None:
        assert len(s.running) <= 2
        assert len(d.plans[-1].rows) <= 2
    s.check_integrity()
    assert sorted(o.rid for o in d.outs if o.finish) == [f"r{i}" for i in range(5)]
    # the slots are reused
    assert {ns.slot for p in d.plans for ns in p.new_slots} == {0, 1}


def test_pages_run_out_and_requests_are_retracted_then_finish():
    # 64 tokens in pages of 4 = 16 pages; three requests of 6 + 18 tokens (6 pages each) do not fit at once
    s = make_sched(kv_tokens=64, max_slots=4)
    d = Driver(s)
    assert s.add_requests([treq(f"r{i}", n_prompt=6, max_new_tokens=18) for i in range(3)]) == []
    d.run()
    assert s.stats["retractions"] > 0 or any(len(p.new_slots) < 3 for p in d.plans[:1])
    assert {o.rid: sum(len(x.new_ids) for x in d.by_rid(o.rid)) for o in d.outs if o.finish} == {
        "r0": 18, "r1": 18, "r2": 18}


def test_prefill_token_budget():
    s = make_sched(max_prefill_tokens=16)
    d = Driver(s)
    s.add_requests([treq(f"r{i}", n_prompt=10, max_new_tokens=5) for i in range(3)])
    assert len(d.step().new_slots) == 1  # 10 + 10 > 16
    assert len(d.step().new_slots) == 1
    d.run()
    # a single prompt longer than the budget still runs (alone)
    s = make_sched(max_prefill_tokens=16)
    d = Driver(s)
    s.add_requests([treq("big", n_prompt=40, max_new_tokens=2), treq("small", n_prompt=2, max_new_tokens=2)])
    p = d.step()
    assert [len(r.input_ids) for r in p.rows] == [40]
    d.run()


def test_budget_admits_several_small():
    s = make_sched(max_prefill_tokens=16)
    d = Driver(s)
    s.add_requests([treq(f"r{i}", n_prompt=5, max_new_tokens=1) for i in range(4)])
    assert len(d.step().new_slots) == 3


# ------------------------------------------------------------------ admission limits
def test_request_that_can_never_fit_is_rejected():
    s = make_sched(kv_tokens=64, context_len=256)
    rej = s.add_requests([treq("ok", n_prompt=10, max_new_tokens=54), treq("clamped", n_prompt=10, max_new_tokens=55),
                          treq("no2", n_prompt=70, max_new_tokens=1)])
    assert [r for r, _, _ in rej] == ["no2"]
    assert rej[0][1] == "value" and "exceeds the KV cache capacity" in rej[0][2] and "64 tokens" in rej[0][2]
    assert [r.rid for r in s.waiting] == ["ok", "clamped"]
    assert s.waiting[1].max_new_tokens == 54  # clamped to the pool, as SGLang does
    assert s.take_outputs() == []
    d = Driver(s)
    d.run()



def test_unlimited_max_new_tokens_clamped_to_kv_pool():
    s = make_sched(kv_tokens=64, context_len=256)
    assert s.add_requests([treq("u", n_prompt=10, max_new_tokens=None)]) == []


def test_max_new_clamped_to_context():
    s = make_sched(context_len=32)
    d = Driver(s)
    s.add_requests([treq("a", n_prompt=28, max_new_tokens=100), treq("u", n_prompt=30, max_new_tokens=None)])
    d.run()
    fins = {o.rid: o.finish for o in d.outs if o.finish}
    assert fins == {"a": FinishReason(type="length", length=4), "u": FinishReason(type="length", length=2)}


def test_max_new_tokens_zero_finishes_at_once():
    s = make_sched()
    assert s.add_requests([treq("z", n_prompt=7, max_new_tokens=0)]) == []
    assert s.is_idle() and s.schedule() is None
    (o,) = s.take_outputs()
    assert o.rid == "z" and o.new_ids == [] and o.finish == FinishReason(type="length", length=0)
    assert o.prompt_tokens == 7 and o.context_ids == treq("z", n_prompt=7).input_ids[-DETOKENIZE_CONTEXT:]
    s.check_integrity()


# ------------------------------------------------------------------ abort
def test_abort_waiting_request():
    s = make_sched(max_slots=1)
    d = Driver(s)
    s.add_requests([treq("a", max_new_tokens=5), treq("b", max_new_tokens=5)])
    d.step()
    s.abort("b", abort_all=False)
    (o,) = s.take_outputs()
    assert o.rid == "b" and o.finish == FinishReason(type="abort", message="Abort in waiting queue")
    assert o.finish.to_json() == {"type": "abort", "message": "Abort in waiting queue"}
    assert o.new_ids == [] and o.completion_tokens == 0
    assert not s.waiting and [r.rid for r in s.running] == ["a"]
    d.run()
    assert [x.rid for x in d.outs if x.finish] == ["a"]


def test_abort_running_request_frees_pages_and_slot():
    s = make_sched()
    d = Driver(s)
    s.add_requests([treq("a", max_new_tokens=50), treq("b", max_new_tokens=3)])
    d.step()
    d.step()
    s.abort("a", abort_all=False)
    (o,) = s.take_outputs()
    assert o.rid == "a" and o.finish == FinishReason(type="abort", message="Aborted")
    assert o.new_ids == [5, 5] and o.completion_tokens == 2
    assert [r.rid for r in s.running] == ["b"]
    assert s.slots.free_slots == s.slots.num_slots - 1
    d.run()
    assert [x.rid for x in d.outs if x.finish] == ["b"]


def test_abort_running_streaming_request_emits_final_empty_chunk():
    s = make_sched()
    d = Driver(s)
    s.add_requests([treq("a", stream=True, max_new_tokens=50)])
    d.step()
    d.step()
    assert [o.new_ids for o in d.outs] == [[5], [5]]
    s.abort("a", abort_all=False)
    (o,) = s.take_outputs()
    assert o.new_ids == [] and o.finish.type == "abort" and o.context_ids == []
    s.check_integrity()


def test_abort_while_step_in_flight():
    s = make_sched()
    s.add_requests([treq("a", max_new_tokens=50), treq("b", max_new_tokens=2)])
    s.schedule()
    s.apply_result([5, 5])
    plan = s.schedule()
    assert len(plan.rows) == 2
    s.abort("a", abort_all=False)
    s.apply_result([6, 6])  # a's token is dropped, b finishes
    outs = s.take_outputs()
    assert [(o.rid, o.finish.type, o.new_ids) for o in outs] == [("a", "abort", [5]), ("b", "length", [5, 6])]
    assert s.is_idle()
    s.check_integrity()


def test_abort_by_rid_prefix():
    s = make_sched(max_slots=2)
    d = Driver(s)
    s.add_requests([treq(r, max_new_tokens=20) for r in ("x_0", "y", "x_1", "xy", "x")])
    d.step()  # x_0 and y run; x_1, xy, x wait
    s.abort("x", abort_all=False)
    outs = s.take_outputs()
    assert sorted((o.rid, o.finish.message) for o in outs) == [
        ("x", "Abort in waiting queue"), ("x_0", "Aborted"), ("x_1", "Abort in waiting queue")]
    assert [r.rid for r in s.running] == ["y"] and [r.rid for r in s.waiting] == ["xy"]
    d.run()


def test_abort_nested_batch_rids():
    s = make_sched()
    s.add_requests([treq(r, max_new_tokens=20) for r in ("r_0_0", "r_0_1", "r_1_0", "r10")])
    s.schedule()
    s.apply_result([5] * 4)
    s.take_outputs()
    s.abort("r_0", abort_all=False)
    assert sorted(o.rid for o in s.take_outputs()) == ["r_0_0", "r_0_1"]
    s.abort("r", abort_all=False)
    assert [o.rid for o in s.take_outputs()] == ["r_1_0"]
    assert [r.rid for r in s.running] == ["r10"]


def test_abort_all():
    s = make_sched(max_slots=2)
    d = Driver(s)
    s.add_requests([treq(f"r{i}", max_new_tokens=20) for i in range(4)])
    d.step()
    s.abort("", abort_all=True)
    outs = s.take_outputs()
    assert sorted(o.rid for o in outs) == ["r0", "r1", "r2", "r3"]
    assert all(o.finish.type == "abort" for o in outs)
    assert s.is_idle()
    s.check_integrity()
    assert s.schedule() is None


def test_abort_unknown_rid_is_noop():
    s = make_sched()
    s.add_requests([treq("a", max_new_tokens=2)])
    s.abort("nope", abort_all=False)
    s.abort("", abort_all=False)
    assert s.take_outputs() == [] and len(s.waiting) == 1


# ------------------------------------------------------------------ outputs
def test_context_ids_only_on_first_emission():
    s = make_sched()
    d = Driver(s)
    tr = treq("a", n_prompt=9, stream=True, max_new_tokens=3)
    s.add_requests([tr])
    d.run()
    outs = d.by_rid("a")
    assert [o.new_ids for o in outs] == [[5], [5], [5]]
    assert outs[0].context_ids == tr.input_ids[-DETOKENIZE_CONTEXT:]
    assert all(o.context_ids == [] for o in outs[1:])
    assert [o.completion_tokens for o in outs] == [1, 2, 3]
    assert [o.finish is not None for o in outs] == [False, False, True]


def test_short_prompt_context_ids():
    s = make_sched()
    d = Driver(s)
    s.add_requests([treq("a", n_prompt=2, max_new_tokens=1)])
    d.run()
    assert d.outs[0].context_ids == [1, 2]


@pytest.mark.parametrize("sampling,tokens,finish,trim_str,trim_tok,new_ids", [
    ({"stop": "hi"}, ids_of("xhi"), FinishReason(type="stop", matched="hi"), "hi", False, ids_of("xhi")),
    ({"stop": "hi", "no_stop_trim": True}, ids_of("xhi"), FinishReason(type="stop", matched="hi"), None, False,
     ids_of("xhi")),
    ({}, [5, EOS], FinishReason(type="stop", matched=EOS), None, True, [5, EOS]),
    ({"no_stop_trim": True}, [5, EOS], FinishReason(type="stop", matched=EOS), None, False, [5, EOS]),
    ({"stop_token_ids": [9]}, [5, 9], FinishReason(type="stop", matched=9), None, True, [5, 9]),
    ({"max_new_tokens": 2}, [5, 6], FinishReason(type="length", length=2), None, False, [5, 6]),
    ({"ignore_eos": True, "max_new_tokens": 3}, [EOS, EOS, EOS], FinishReason(type="length", length=3), None, False,
     [EOS, EOS, EOS]),
])
def test_finish_and_trim_flags(sampling, tokens, finish, trim_str, trim_tok, new_ids):
    s = make_sched()
    d = Driver(s)
    s.add_requests([treq("a", **{"max_new_tokens": 20, **sampling})])
    for t in tokens:
        d.step(tokens=[t])
    assert s.is_idle()
    s.check_integrity()
    (o,) = d.outs
    assert o.finish == finish and o.new_ids == new_ids
    assert o.trim_stop_str == trim_str and o.trim_last_token is trim_tok


def test_detokenizer_flags_passed_through():
    s = make_sched()
    d = Driver(s)
    s.add_requests([treq("a", max_new_tokens=1, skip_special_tokens=False, spaces_between_special_tokens=False),
                    treq("b", max_new_tokens=1)])
    d.run()
    a, b = d.outs
    assert (a.skip_special_tokens, a.spaces_between_special_tokens) == (False, False)
    assert (b.skip_special_tokens, b.spaces_between_special_tokens) == (True, True)


def test_non_streaming_emits_once():
    s = make_sched()
    d = Driver(s)
    s.add_requests([treq("a", max_new_tokens=7)])
    d.run()
    assert len(d.outs) == 1 and len(d.outs[0].new_ids) == 7


@pytest.mark.parametrize("server_interval,req_interval,max_new,expected", [
    (1, None, 4, [1, 1, 1, 1]),
    (1, 3, 10, [1, 3, 3, 3]),       # emits at 1, 4, 7, 10 (final)
    (1, 3, 8, [1, 3, 3, 1]),        # 1, 4, 7, then the final chunk at 8
    (2, None, 6, [1, 2, 2, 1]),     # server interval 2: 1, 3, 5, final 6
    (4, 1, 3, [1, 1, 1]),           # the request's interval overrides the server's
    (5, None, 3, [1, 2]),
])
def test_stream_interval(server_interval, req_interval, max_new, expected):
    s = make_sched(stream_interval=server_interval)
    d = Driver(s)
    s.add_requests([treq("a", stream=True, max_new_tokens=max_new, stream_interval=req_interval)])
    d.run()
    outs = d.by_rid("a")
    assert [len(o.new_ids) for o in outs] == expected
    assert [o.finish is not None for o in outs] == [False] * (len(expected) - 1) + [True]
    assert sum((o.new_ids for o in outs), []) == [5] * max_new
    assert sum(1 for o in outs if o.context_ids) == 1 and outs[0].context_ids


def test_mixed_stream_and_non_stream():
    s = make_sched()
    d = Driver(s)
    s.add_requests([treq("s", stream=True, max_new_tokens=3), treq("n", max_new_tokens=3)])
    d.run()
    assert [len(o.new_ids) for o in d.by_rid("s")] == [1, 1, 1]
    assert [len(o.new_ids) for o in d.by_rid("n")] == [3]


def test_take_outputs_drains():
    s = make_sched()
    s.add_requests([treq("a", stream=True, max_new_tokens=2)])
    s.schedule()
    s.apply_result([5])
    assert len(s.take_outputs()) == 1
    assert s.take_outputs() == []


def test_internal_state_and_integrity():
    s = make_sched(page_size=4, kv_tokens=512, max_slots=4)
    st = s.internal_state()
    assert st["num_pages"] == st["free_pages"] == 128 and st["page_size"] == 4
    assert st["max_total_tokens"] == 512 and st["max_running_requests"] == 4 and st["context_length"] == 256
    s.add_requests([treq("a", n_prompt=6, max_new_tokens=10)])
    s.schedule()
    st = s.internal_state()
    assert st["num_running"] == 1 and st["free_pages"] == 128 - 2 and st["free_slots"] == 3 and st["step"] == 1
    s.check_integrity()  # not idle: nothing checked
    s.apply_result([EOS])
    assert s.is_idle()
    s.check_integrity()
    s.pages.alloc(1)  # a simulated leak is caught
    with pytest.raises(AssertionError, match="KV page leak"):
        s.check_integrity()


def test_many_requests_random_lengths_no_leak():
    import random

    rng = random.Random(0)
    s = make_sched(page_size=4, kv_tokens=256, max_slots=3, max_prefill_tokens=32)
    d = Driver(s)
    expected = {}

    def step() -> bool:
        """One step whose sampled token is EOS exactly where a request should stop."""
        plan = s.schedule()
        if plan is None:
            return False
        d.check_plan(plan)
        toks = []
        for req in [b.req for b in s.plan_rows if b.samples]:
            _, at = expected[req.rid]
            toks.append(EOS if at is not None and len(req.output_ids) + 1 == at else 5)
        s.apply_result(toks)
        d.outs += s.take_outputs()
        return True

    for i in range(30):
        n_prompt, max_new = rng.randint(1, 30), rng.randint(1, 20)
        stop_at = rng.choice([None, rng.randint(1, max_new)])
        expected[f"r{i}"] = (max_new, stop_at)
        s.add_requests([treq(f"r{i}", n_prompt=n_prompt, max_new_tokens=max_new, stream=rng.random() < 0.5)])
        if rng.random() < 0.5:
            step()
    while step():
        pass
    assert s.is_idle()
    s.check_integrity()
    for rid, (max_new, at) in expected.items():
        outs = d.by_rid(rid)
        ids = sum((o.new_ids for o in outs), [])
        assert outs[-1].finish is not None and all(o.finish is None for o in outs[:-1])
        assert len(ids) == (at if at is not None else max_new)


# ------------------------------------------------------------------ scheduler -> detokenizer
def _stream_text(stream: bool, tokens: list[int], **sampling) -> list[str]:
    from treadle.detokenizer_proc.incremental import IncrementalDetokenizer

    s = make_sched()
    d = Driver(s)
    det = IncrementalDetokenizer(TOK)
    s.add_requests([treq("a", stream=stream, max_new_tokens=20, **sampling)])
    deltas = []
    for t in tokens:
        d.step(tokens=[t])
    for o in d.outs:
        deltas.append(det.add(o.rid, o.new_ids, context_ids=o.context_ids, finished=o.finish is not None,
                              skip_special_tokens=o.skip_special_tokens, trim_stop_str=o.trim_stop_str,
                              trim_last_token=o.trim_last_token))
    assert s.is_idle()
    return deltas


def test_stop_string_trimmed_non_stream():
    assert "".join(_stream_text(False, ids_of("xyhi"), stop="hi")) == "xy"
    assert "".join(_stream_text(False, ids_of("xy") + [EOS], stop="hi")) == "xy"



def test_stop_string_prefix_never_streamed():
    deltas = _stream_text(True, ids_of("xyhi"), stop="hi")
    assert "".join(deltas) == "xy"


def test_chunked_prompts_under_memory_pressure_never_overdraw_pages():
    """A chunked prompt's later chunks take only the pages left after the decodes, and a prompt
    that can't take even one waits or is retracted: the pool never raises and everything finishes
    (this once killed the scheduler with MemoryError)."""
    s = make_sched(page_size=4, kv_tokens=160, max_slots=4, chunk=12)
    d = Driver(s)
    for i in range(6):
        s.add_requests([treq(f"r{i}", n_prompt=21, max_new_tokens=40, ignore_eos=True)])
    d.run()
    done = {o.rid for o in d.outs if o.finish is not None}
    assert done == {f"r{i}" for i in range(6)}
    assert all(len([o for o in d.outs if o.rid == f"r{i}"]) >= 1 for i in range(6))
    assert s.pages.free_pages == s.pages.num_pages and s.is_idle()


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_log_requests_levels(level, caplog):
    s = make_sched(log_requests=True, log_requests_level=level)
    s.add_requests([treq("logged", n_prompt=70, max_new_tokens=3, temperature=0.5)])
    with caplog.at_level("INFO", logger="treadle.scheduler"):
        s.add_requests([treq("logged2", n_prompt=70, max_new_tokens=3, temperature=0.5)])
        Driver(s).run()
    lines = [r.getMessage() for r in caplog.records if "logged2" in r.getMessage()]
    receive, finish = (next(m for m in lines if m.startswith(e)) for e in ("receive", "finish"))
    assert "prompt_tokens=70 max_new_tokens=3" in receive and "completion_tokens=3" in finish
    assert ('"temperature":0.5' in receive) == (level >= 1)
    assert ("input_ids=" in receive and "output_ids=" in finish) == (level >= 2)
    assert ("'...'" in receive) == (level == 2)  # 70 ids: the middle left out at level 2 only


def test_retractions_and_time_stats_in_the_token_outs():
    """Each output carries the request's retraction count; with ``enable_metrics`` the first output
    after the prefill carries the time stats (once), all non-negative."""
    s = make_sched(kv_tokens=64, max_slots=4, enable_metrics=True, max_prefill_tokens=6)
    d = Driver(s)
    assert s.add_requests([treq(f"r{i}", n_prompt=6, max_new_tokens=18, stream=True) for i in range(3)]) == []
    d.run()
    assert s.stats["retractions"] > 0
    finals = {o.rid: o for o in d.outs if o.finish}
    assert sum(o.num_retractions for o in finals.values()) == s.stats["retractions"]
    for rid in finals:
        stats = [o.time_stats for o in d.by_rid(rid) if o.time_stats]
        assert len(stats) == 1, rid
        assert set(stats[0]) == {"queue_time", "prefill_launch_delay", "prefill_launch_latency"}
        assert all(v >= 0 for v in stats[0].values())
    # the third request waits for a prefill budget of 6 tokens a step: it queued longer than the first
    first = {rid: next(o.time_stats for o in d.by_rid(rid) if o.time_stats) for rid in finals}
    assert first["r2"]["queue_time"] >= first["r0"]["queue_time"]


def test_no_time_stats_without_enable_metrics():
    s = make_sched()
    d = Driver(s)
    s.add_requests([treq("r0", max_new_tokens=3, stream=True)])
    d.run()
    assert all(not o.time_stats and o.num_retractions == 0 for o in d.outs)


def test_peak_growth():
    from treadle.scheduler_proc.memory import peak_growth

    assert peak_growth([]) == 0
    assert peak_growth([(10, 100)]) == 10  # one request: all it still makes
    # (5 left, holds 100) and (20 left, holds 10): at step 5 both grew 5 (10); then the first frees
    # 105 and the second grows to 20: the peak is 10
    assert peak_growth([(5, 100), (20, 10)]) == 10
    # the first holds little: at step 20 the second has grown 20 and the first freed only 5 + 1
    assert peak_growth([(5, 1), (20, 10)]) == 20 - 1
    assert peak_growth([(7, 3), (7, 4), (7, 5)]) == 21  # equal lengths all run to the end


def brute_peak(reqs):
    """Step by step: tokens held beyond now, the finished ones freed after their last step."""
    best = 0
    for t in range(max((r for r, _ in reqs), default=0) + 1):
        best = max(best, sum(t if t <= r else -h for r, h in reqs))
    return best


@pytest.mark.parametrize("seed", range(20))
def test_peak_growth_matches_stepping(seed):
    import random

    from treadle.scheduler_proc.memory import peak_growth

    rng = random.Random(seed)
    reqs = [(rng.randint(0, 40), rng.randint(1, 60)) for _ in range(rng.randint(1, 12))]
    assert peak_growth(reqs) == brute_peak(reqs)


def test_certain_lengths_fill_the_pool_without_retractions():
    """With ``lof``, ignore_eos requests (their KV need is known) are admitted against the peak of
    their joint growth, and none is retracted (SGLang's ratio estimate retracts here)."""
    for policy in ("lof",):
        s = make_sched(kv_tokens=256, max_slots=16, schedule_policy=policy, context_len=256)
        d = Driver(s)
        reqs = [treq(f"r{i}", n_prompt=8 + 3 * i, max_new_tokens=10 + (7 * i) % 40, ignore_eos=True) for i in range(12)]
        assert s.add_requests(reqs) == []
        d.run()
        assert s.stats["retractions"] == 0, policy
        assert {o.rid for o in d.outs if o.finish} == {f"r{i}" for i in range(12)}
        s.check_integrity()
