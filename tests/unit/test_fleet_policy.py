"""The router's placement: the approximate prefix tree and the cache-aware policy over it."""

from __future__ import annotations

from treadle.deploy.pool import Pool
from treadle.deploy.prefix_tree import PrefixTree
from treadle.deploy.spec import RouterSpec


def test_tree_match_split_and_sizes():
    t = PrefixTree()
    t.insert("hello world", "a")
    t.insert("hello there", "b")
    assert t.match("hello world!") == {"a": 11, "b": 6}
    assert t.match("help") == {"a": 3, "b": 3}
    assert t.match("xyz") == {}
    assert t.size("a") == 11 and t.size("b") == 11  # each counts the shared "hello " once for itself
    t.insert("hello world", "b")
    assert t.match("hello world") == {"a": 11, "b": 11} and t.size("b") == 16


def test_tree_evicts_least_recently_used_per_worker():
    t = PrefixTree(max_chars=25)
    t.insert("aaaaaaaaaa", "w")
    t.insert("bbbbbbbbbb", "w")
    t.insert("aaaaaaaaaa", "w")  # "a..." used last: "b..." goes first
    t.insert("cccccccccc", "w")
    assert t.size("w") <= 25
    assert t.match("bbbbbbbbbb") == {} and t.match("aaaaaaaaaa") == {"w": 10} and t.match("cccccccccc") == {"w": 10}
    t.insert("aaaaaaaaaa", "other")
    t.remove_worker("w")
    assert t.size("w") == 0 and t.match("aaaaaaaaaa") == {"other": 10}


def pool(**kw) -> Pool:
    p = Pool(RouterSpec(**kw), ["a", "b"])
    p.set_up("a", "http://a", fresh=True)
    p.set_up("b", "http://b", fresh=True)
    return p


def test_shared_prefix_follows_its_worker_and_unrelated_spread():
    p = pool()
    prefix = "You are a helpful assistant. " * 20
    first = p.pick(prefix + "Question 0")
    assert all(p.pick(prefix + f"Question {i}").name == first.name for i in range(1, 10))
    assert p.last_reason == "cache"
    for m in p.members.values():
        m.inflight = 0
    names = [p.pick(f"{i * 7919} unrelated text number {i}").name for i in range(40)]
    assert 15 <= names.count("a") <= 25  # least loaded first: they alternate


def test_imbalance_overrides_the_cache():
    p = pool(balance_abs_threshold=4, balance_rel_threshold=1.5)
    first = p.pick("shared prefix " * 10)
    first.inflight = 10
    other = p.pick("shared prefix " * 10 + "more")
    assert other.name != first.name and p.last_reason == "balance"


def test_sessions_exclusion_and_no_worker():
    p = pool()
    a = p.pick("x", session="s1")
    for _ in range(5):
        assert p.pick("completely different", session="s1").name == a.name
    assert p.pick("y", exclude=[a.name]).name != a.name
    p.report_failure("a")
    p.report_failure("b")
    assert p.pick("z") is None
    p.set_up("b", "http://b")
    assert p.pick("z", session="s1").name == "b"  # its worker is down: the session moves
    assert p.sessions["s1"] == "b"


def test_round_robin_and_least_load():
    p = pool(policy="round_robin")
    assert [p.pick("same").name for _ in range(4)] == ["a", "b", "a", "b"]
    p = pool(policy="least_load")
    p.members["a"].inflight = 3
    assert p.pick("same").name == "b" and p.last_reason == "load"
