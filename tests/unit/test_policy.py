"""Waiting-queue orders (``scheduler_proc/policy.py``): every ``schedule_policy`` SGLang names, on
hand-made queues, and ``lof`` / ``dfs-weight`` through the scheduler."""

from __future__ import annotations

import random

import pytest

from treadle.runtime.messages import TokenizedReq
from treadle.runtime.sampling_params import SamplingParams
from treadle.scheduler_proc.kv_pool import PageAllocator
from treadle.scheduler_proc.policy import LPM_MAX_QUEUE, dfs_weight_order, order_waiting
from treadle.scheduler_proc.radix_cache import RadixCache
from treadle.scheduler_proc.req import Req

from test_scheduler import Driver, make_sched, treq


def req(rid: str, ids: list[int], max_new: int = 8, priority=None) -> Req:
    tr = TokenizedReq(rid=rid, input_ids=ids, sampling=SamplingParams(max_new_tokens=max_new), stream=False,
                      priority=priority)
    return Req(tr, max_new, set())


def rids(reqs: list[Req]) -> list[str]:
    return [r.tokenized.rid for r in reqs]


def order(waiting, policy, priority=False, cache=None, seed=0):
    match = (lambda r: cache.match_prefix(r.tokenized.input_ids, len(r.tokenized.input_ids) - 1)) if cache else (lambda r: ([], None))
    return rids(order_waiting(waiting, policy, priority, match, random.Random(seed)))


def test_fcfs_and_lof():
    q = [req("a", [1, 2], 5), req("b", [3], 50), req("c", [4], 20), req("d", [5], 50)]
    assert order(q, "fcfs") == ["a", "b", "c", "d"]
    assert order(q, "lof") == ["b", "d", "c", "a"]  # ties keep arrival order


def test_priority_first_then_policy():
    q = [req("a", [1], 5, priority=1), req("b", [2], 50), req("c", [3], 20, priority=1), req("d", [4], 90)]
    assert order(q, "lof", priority=True) == ["c", "a", "d", "b"]
    assert order(q, "priority", priority=True) == ["a", "c", "b", "d"]


def test_random_is_a_seeded_shuffle():
    q = [req(str(i), [i + 1]) for i in range(20)]
    first = order(q, "random", seed=3)
    assert sorted(first) == sorted(rids(q)) and first != rids(q)
    assert order(q, "random", seed=3) == first and order(q, "random", seed=4) != first


def cached(prefixes: list[list[int]]) -> RadixCache:
    alloc = PageAllocator(8192, 1)
    cache = RadixCache(1, alloc)
    for ids in prefixes:
        cache.insert(ids, alloc.alloc(len(ids)))
    return cache


def test_dfs_weight_groups_the_heaviest_branch_first():
    # cached: [1,2,3] and [1,2,9] (sharing [1,2]), and [7,7]
    cache = cached([[1, 2, 3], [1, 2, 9], [7, 7]])
    q = [req("x1", [7, 7, 5, 5]),                    # ends at [7,7]
         req("a1", [1, 2, 3, 4]), req("b1", [1, 2, 9, 4]),  # under [1,2]
         req("none", [8, 8]),                        # no cached prefix: the root
         req("a2", [1, 2, 3, 6]), req("b2", [1, 2, 9, 0]), req("a3", [1, 2, 3, 5])]
    # [1,2] weighs 5 (a: 3, b: 2), [7,7] 1; each node's requests in arrival order after its children
    assert order(q, "dfs-weight", cache=cache) == ["a1", "a2", "a3", "b1", "b2", "x1", "none"]
    assert order(q, "lpm", cache=cache)[:5] == ["a1", "b1", "a2", "b2", "a3"]


def test_dfs_weight_long_chain_and_no_cache():
    chain = list(range(1, 3001))
    cache = cached([chain[:n] for n in range(1, 3001, 3)])  # a path of ~1,000 nodes: no recursion
    q = [req("deep", chain + [0]), req("shallow", [1, 2, 99])]
    assert order(q, "dfs-weight", cache=cache) == ["deep", "shallow"]
    assert dfs_weight_order(q, lambda r: None) == q  # no cache: arrival order


def test_big_queues_fall_back_to_arrival_order():
    cache = cached([[1, 2, 3]])
    q = [req(str(i), [5, i % 7 + 1]) for i in range(LPM_MAX_QUEUE)] + [req("hit", [1, 2, 3, 4])]
    for policy in ("lpm", "dfs-weight"):
        assert order(q, policy, cache=cache) == rids(q)


@pytest.mark.parametrize("policy", ["lof", "dfs-weight", "random"])
def test_scheduler_admits_in_policy_order(policy):
    s = make_sched(max_slots=1, radix=True, schedule_policy=policy)
    lengths = [3, 9, 5, 7]
    for i, n in enumerate(lengths):
        s.add_requests([treq(f"r{i}", n_prompt=6, max_new_tokens=n, ignore_eos=True)])
    d = Driver(s)
    d.run()
    finished = [o.rid for o in d.outs if o.finish is not None]
    assert sorted(finished) == [f"r{i}" for i in range(4)]
    if policy == "lof":  # one slot: requests run one at a time, longest output first
        assert finished == ["r1", "r3", "r2", "r0"]
