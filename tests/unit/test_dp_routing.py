"""Data parallelism without processes: the router's policy, the tokenizer's dispatch, process names,
and the start-up check that the GPUs suffice for every DP group."""

from __future__ import annotations

import pytest

from treadle.client.supervisor import dp_rank_of, group_name
from treadle.runtime.messages import GenerateBatch, GenerateReq, ReqError, TokenizedBatch, TokenizedReq
from treadle.runtime.sampling_params import SamplingParams
from treadle.runtime.server_args import ServerArgs
from treadle.tokenizer_proc.main import dispatch
from treadle.tokenizer_proc.router import AFFINITY_SLACK, AFFINITY_TOKENS, DpRouter

LONG = list(range(100, 100 + AFFINITY_TOKENS))  # a prompt long enough to have a prefix key


def test_least_loaded_and_ties_alternate():
    r = DpRouter(2)
    assert [r.route(f"a{i}", [1, 2, 3]) for i in range(6)] == [0, 1, 0, 1, 0, 1]
    r.done(["a0", "a2", "a4"])  # group 0 drained: the next two go there
    assert [r.route("b0", [1]), r.route("b1", [1])] == [0, 0]
    assert r.load == [2, 3] and r.served == [5, 3]
    r.done(["a1", "a3", "a5", "b0", "b1", "unknown"])
    assert r.load == [0, 0] and not r.owner
    # idle groups: the one that served fewer gets the next request
    assert r.route("c", [1]) == 1


def test_reused_rid_is_counted_once():
    r = DpRouter(2)
    r.route("x", [1])
    r.route("x", [1])  # its first run was aborted and has not reported done yet
    assert sum(r.load) == 1
    r.done(["x"])
    assert r.load == [0, 0]


def test_prefix_affinity_until_the_group_is_much_busier():
    r = DpRouter(2)
    first = r.route("p0", LONG + [1])
    assert first == 0
    # same first tokens: the owner keeps them while it is at most AFFINITY_SLACK ahead
    picks = [r.route(f"p{i}", LONG + [i]) for i in range(1, AFFINITY_SLACK + 3)]
    # once it is more than that ahead one spills to the other group, then the owner is in reach again
    assert picks == [0] * AFFINITY_SLACK + [1, 0]
    assert r.prefixes[hash(tuple(LONG))] == 0  # the owner stays the first group
    # a different prefix or a short prompt goes to the least loaded group
    assert r.route("q", list(range(500, 500 + AFFINITY_TOKENS))) == 1
    assert r.route("s", LONG[:10]) == 1


def test_group_down_fails_its_requests_and_routes_around_it():
    r = DpRouter(3)
    for i in range(6):
        r.route(f"r{i}", [1])
    r.route("long", LONG)
    owner = r.owner["long"]
    lost = r.group_down(owner, "dp worker died")
    assert "long" in lost and all(r.owner.get(x) is None for x in lost)
    assert r.load[owner] == 0 and r.live() == [g for g in range(3) if g != owner]
    assert all(r.route(f"n{i}", [1]) != owner for i in range(10))
    assert r.route("long2", LONG) != owner  # its prefix moves to a live group
    assert r.state()[owner] == {"dp_rank": owner, "alive": False, "in_flight": 0, "served": r.served[owner],
                                "error": "dp worker died"}


def test_pinned_requests_go_to_their_group():
    r = DpRouter(2)
    assert [r.route(f"s{i}", [1], pinned=1) for i in range(3)] == [1, 1, 1]
    assert r.route("free", [1]) == 0


class FakeSender:
    def __init__(self) -> None:
        self.sent: list = []

    def send(self, msg) -> None:
        self.sent.append(msg)


def _call(n: int, pinned=None) -> tuple[GenerateBatch, TokenizedBatch]:
    reqs = [GenerateReq(rid=f"r{i}", input_ids=[1, 2], dp_rank=pinned) for i in range(n)]
    toks = [TokenizedReq(rid=f"r{i}", input_ids=[1, 2], sampling=SamplingParams()) for i in range(n)]
    return GenerateBatch(call_id=7, reqs=reqs), TokenizedBatch(reqs=toks)


def test_dispatch_splits_a_call_over_the_groups():
    groups, inbox, router = [FakeSender(), FakeSender()], FakeSender(), DpRouter(2)
    dispatch(*_call(5), groups, router, inbox)
    assert [[t.rid for t in b.reqs] for g in groups for b in g.sent] == [["r0", "r2", "r4"], ["r1", "r3"]]
    assert not inbox.sent
    single = [FakeSender()]
    dispatch(*_call(3), single, None, inbox)  # dp_size 1: the call goes through whole
    assert len(single[0].sent) == 1 and len(single[0].sent[0].reqs) == 3


def test_dispatch_fails_a_call_pinned_to_a_dead_group():
    groups, inbox, router = [FakeSender(), FakeSender()], FakeSender(), DpRouter(2)
    router.group_down(1, "DP group 1 is out of service")
    dispatch(*_call(2, pinned=1), groups, router, inbox)
    assert not groups[0].sent and not groups[1].sent
    assert inbox.sent == [ReqError(kind="dead", message="DP group 1 is out of service", call_id=7)]
    router.group_down(0, "gone")
    dispatch(*_call(1), groups, router, inbox)
    assert inbox.sent[-1].kind == "dead" and "Every DP group is dead" in inbox.sent[-1].message


def test_group_process_names():
    assert [group_name(0, "scheduler"), group_name(2, "worker1")] == ["scheduler", "dp2_worker1"]
    assert [dp_rank_of(n) for n in ("tokenizer", "detokenizer", "worker0", "scheduler", "dp1_worker0",
                                    "dp12_scheduler")] == [None, None, 0, 0, 1, 12]


def test_too_few_gpus_for_every_group_is_a_clear_error(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    ServerArgs(device="cuda", dp_size=2, tp_size=2).resolved()  # GPUs 0..3
    ServerArgs(device="cuda", dp_size=3, base_gpu_id=1).resolved()  # GPUs 1..3
    for bad in ({"dp_size": 2, "tp_size": 2, "base_gpu_id": 1}, {"dp_size": 5}, {"tp_size": 8},
                {"dp_size": 2, "tp_size": 2, "pp_size": 2}, {"dp_size": 2, "gpu_id_step": 4}):
        with pytest.raises(ValueError, match="Not enough GPUs"):
            ServerArgs(device="cuda", **bad).resolved()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ServerArgs(device="cpu", dp_size=8, tp_size=8).resolved()  # no limit on the CPU


def test_dp_size_is_supported():
    ServerArgs(dp_size=2).check_supported()
