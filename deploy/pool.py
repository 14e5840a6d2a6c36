"""The router's view of the workers, and the policy that picks one for a request.

The supervisor (or the Ray backend) owns the workers' life and tells the pool each worker's URL
and health; the router counts the requests it has in flight on each (the load) and reports a
connection that failed, which takes the worker out of rotation at once until the next good probe.

``cache_aware`` is SGLang router's policy: when the load is balanced, a request follows the
worker whose prefix tree matches at least ``cache_threshold`` of its text; otherwise (or when
nothing matches that well) it goes to the least loaded worker, the smallest tree breaking ties.
The load counts as imbalanced when the busiest worker has more than ``balance_abs_threshold``
requests more than the idlest, and more than ``balance_rel_threshold`` times as many.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Optional

from treadle.deploy.prefix_tree import PrefixTree
from treadle.deploy.spec import RouterSpec


@dataclass
class Member:
    name: str
    url: Optional[str] = None   # None until it has started (a port, a Ray node)
    healthy: bool = False
    inflight: int = 0
    routed: int = 0             # requests sent to it, all time
    last_progress: float = 0.0  # monotonic time of its last answer or stream event (while busy: alive)


class Pool:
    def __init__(self, spec: RouterSpec, names: Iterable[str]) -> None:
        self.spec = spec
        self.members = {n: Member(n) for n in names}
        self.tree = PrefixTree(spec.max_tree_chars)
        self.sessions: OrderedDict[str, str] = OrderedDict()  # session id -> worker
        self._rr = itertools.count()
        self.last_reason = ""  # why the last pick chose its worker (metrics label)

    # -------------------------------------------------------------- the supervisor's side
    def set_up(self, name: str, url: str, fresh: bool = False) -> None:
        """The worker answers at ``url``; ``fresh``: it has just started (its cache is empty)."""
        m = self.members[name]
        if fresh or m.url != url:
            self.tree.remove_worker(name)
        m.url, m.healthy = url, True

    def set_down(self, name: str) -> None:
        self.members[name].healthy = False

    # -------------------------------------------------------------- the router's side
    def healthy(self) -> list[Member]:
        return [m for m in self.members.values() if m.healthy and m.url]

    def report_failure(self, name: str) -> None:
        """A connection to it failed: no new requests until a probe finds it well again."""
        self.members[name].healthy = False

    def pick(self, text: str, session: Optional[str] = None, exclude: Iterable[str] = ()) -> Optional[Member]:
        """The worker for a request (None: no healthy worker); counts it in flight."""
        cands = [m for m in self.healthy() if m.name not in set(exclude)]
        if not cands:
            return None
        chosen = self._pinned(session, cands) or self._choose(text, cands)
        if session is not None:
            self.pin(session, chosen.name)
        if text and self.spec.policy == "cache_aware":
            self.tree.insert(text, chosen.name)
        if chosen.inflight == 0:
            chosen.last_progress = time.monotonic()
        chosen.inflight += 1
        chosen.routed += 1
        return chosen

    def done(self, member: Member) -> None:
        member.inflight -= 1
        member.last_progress = time.monotonic()

    def stalled_for(self, name: str) -> float:
        """Seconds the worker has had requests in flight without answering any of them (0: idle)."""
        m = self.members[name]
        return time.monotonic() - m.last_progress if m.inflight else 0.0

    def pin(self, session: str, worker: str) -> None:
        self.sessions[session] = worker
        self.sessions.move_to_end(session)
        while len(self.sessions) > self.spec.max_sessions:
            self.sessions.popitem(last=False)

    def unpin(self, session: str) -> Optional[str]:
        return self.sessions.pop(session, None)

    def _pinned(self, session: Optional[str], cands: list[Member]) -> Optional[Member]:
        name = self.sessions.get(session) if session is not None else None
        found = next((m for m in cands if m.name == name), None)
        if found is not None:
            self.last_reason = "session"
        return found

    def _choose(self, text: str, cands: list[Member]) -> Member:
        policy = self.spec.policy
        if policy == "round_robin":
            self.last_reason = "round_robin"
            return cands[next(self._rr) % len(cands)]
        least = min(cands, key=lambda m: (m.inflight, self.tree.size(m.name), m.routed))
        if policy == "least_load" or not text:
            self.last_reason = "load"
            return least
        loads = [m.inflight for m in cands]
        if max(loads) - min(loads) > self.spec.balance_abs_threshold and \
                max(loads) > self.spec.balance_rel_threshold * min(loads):
            self.last_reason = "balance"
            return least
        matches = self.tree.match(text)
        best = max(cands, key=lambda m: (matches.get(m.name, 0), -m.inflight))
        if matches.get(best.name, 0) >= self.spec.cache_threshold * len(text) and matches.get(best.name, 0) > 0:
            self.last_reason = "cache"
            return best
        self.last_reason = "load"
        return least
