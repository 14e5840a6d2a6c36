"""``KvBudget`` (``scheduler_proc/memory.py``) and the step draft (``scheduler_proc/plan.py``) on their
own: the hold on a matched prefix during admission, giving a request's KV back with or without a
prefix cache, eviction when pages run short, and the booking of planned rows."""

from __future__ import annotations

import pytest

from treadle.runtime.messages import PlanRow, TokenizedReq
from treadle.runtime.sampling_params import SamplingParams
from treadle.runtime.server_args import ServerArgs
from treadle.scheduler_proc.lora_slots import LoraSlots
from treadle.scheduler_proc.memory import KvBudget
from treadle.scheduler_proc.plan import StepDraft
from treadle.scheduler_proc.radix_cache import NoPrefixCache, RadixCache
from treadle.scheduler_proc.req import Req

PS = 4


def budget(prefix_caching: bool = True, num_pages: int = 16) -> KvBudget:
    args = ServerArgs(device="cpu", page_size=PS).resolved()
    return KvBudget(args, num_pages * PS, max_slots=2, lora=LoraSlots(0, "lru"), prefix_caching=prefix_caching)


def running_req(kv: KvBudget, ids: list[int], computed: int) -> Req:
    """A request admitted without a cached prefix that has ``computed`` positions of KV."""
    req = Req(TokenizedReq(rid="r", input_ids=ids, sampling=SamplingParams()), 8, set())
    req.slot = kv.slots.alloc()
    req.cache_node = kv.cache.match_prefix([])[1]
    kv.cache.lock(req.cache_node)
    kv.grow(req, computed)
    req.num_computed = req.prefill_end = computed
    return req


def test_hold_keeps_a_matched_prefix_out_of_eviction_only_while_weighed():
    kv = budget()
    assert isinstance(kv.cache, RadixCache)
    kv.cache.insert(list(range(8)), kv.pages.alloc(2))
    _, node = kv.cache.match_prefix(list(range(9)), max_len=8)
    assert kv.available_pages() == 16
    with kv.hold(node):
        assert kv.cache.evictable_pages == 0 and kv.available_pages() == 14
    assert kv.cache.evictable_pages == 2
    for _ in range(3):  # left by break (admission stops): unlocked all the same
        with kv.hold(node):
            break
    with pytest.raises(RuntimeError), kv.hold(node):
        raise RuntimeError
    assert kv.cache.locked_pages == 0
    with kv.hold(node):
        kv.cache.lock(node)  # an admitted request takes a lock of its own
    assert kv.cache.locked_pages == 2
    kv.cache.check()


def test_free_caches_whole_computed_pages_and_gives_back_the_rest():
    kv = budget()
    req = running_req(kv, list(range(1, 11)), computed=10)  # 10 positions: 2 whole pages and a partial one
    assert len(req.pages) == 3 and kv.pages.free_pages == 13
    kv.free(req)
    assert kv.cache.cached_pages == 2 and kv.pages.free_pages == 14 and kv.slots.free_slots == 2
    assert (req.pages, req.slot, req.cache_node, req.num_computed, req.prefill_end) == ([], None, None, 0, 0)
    assert kv.cache.match_prefix(list(range(1, 11)))[0] != []
    kv.check_idle()


def test_without_a_prefix_cache_free_gives_every_page_back_in_order():
    kv = budget(prefix_caching=False)
    assert isinstance(kv.cache, NoPrefixCache)
    req = running_req(kv, list(range(1, 11)), computed=10)
    pages = list(req.pages)
    kv.free(req)
    assert list(kv.pages._free)[-3:] == pages and kv.pages.free_pages == 16
    kv.check_idle()


def test_take_pages_evicts_cached_pages_when_the_free_list_runs_short():
    kv = budget(num_pages=4)
    kv.cache.insert(list(range(12)), kv.pages.alloc(3))
    assert kv.pages.free_pages == 1 and kv.available_pages() == 4
    assert len(kv.take_pages(3)) == 3 and kv.cache.cached_pages == 0


def test_step_draft_books_each_row_beside_it():
    kv = budget()
    a = running_req(kv, [1, 2, 3], computed=0)
    draft = StepDraft()
    draft.add(a, PlanRow(a.slot, [1, 2, 3], 0, [0, 1, 2]), 3, samples=True, prefill=True)
    assert (a.num_computed, a.samples_in_flight, a.steps_in_flight) == (3, 1, 1)
    draft.add(a, PlanRow(a.slot, [0], 3, [3]), 1, samples=True, prefill=False)
    assert (a.num_computed, a.samples_in_flight, a.steps_in_flight) == (4, 2, 2)
    booked = [(b.req, b.num_tokens, b.samples, b.prefill) for b in draft.booked]
    assert booked == [(a, 3, True, True), (a, 1, True, False)]
    assert len(draft.rows) == len(draft.booked) and draft.has_prefill() and draft.prefill_tokens() == 3
