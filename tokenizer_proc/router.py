"""Data parallelism: which scheduler group (DP rank) runs each request.

The tokenizer routes every request to the live group with the fewest requests in flight (ties go
to the group that has served fewer, so a trickle of single requests alternates). A prompt whose
first ``AFFINITY_TOKENS`` tokens were routed before prefers the group that got them first, whose
radix cache holds that prefix, unless that group has more than ``AFFINITY_SLACK`` requests more in
flight than the least loaded one. In-flight counts go down when the client reports requests done
(``ReqsDone``); a group that dies (``GroupDown``) gets nothing more and its requests are failed.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional

AFFINITY_TOKENS = 64
AFFINITY_SLACK = 8
MAX_PREFIXES = 1 << 16  # remembered prefix hashes (least recently routed dropped first)


class DpRouter:
    def __init__(self, dp_size: int) -> None:
        self.load = [0] * dp_size  # requests in flight
        self.served = [0] * dp_size  # requests routed since start
        self.dead: dict[int, str] = {}  # dp rank -> why it died
        self.owner: dict[str, int] = {}  # rid in flight -> dp rank
        self.prefixes: OrderedDict[int, int] = OrderedDict()  # hash of the first tokens -> dp rank

    def live(self) -> list[int]:
        return [g for g in range(len(self.load)) if g not in self.dead]

    def route(self, rid: str, input_ids: list[int], pinned: Optional[int] = None) -> int:
        """Pick a live group for one request and count it in flight there (``pinned``: a session's
        group, assumed live; check ``dead`` first)."""
        live = self.live()
        if not live:
            raise RuntimeError("no live DP group")
        g = pinned if pinned is not None else min(live, key=lambda r: (self.load[r], self.served[r]))
        key = hash(tuple(input_ids[:AFFINITY_TOKENS])) if len(input_ids) >= AFFINITY_TOKENS else None
        if key is not None and pinned is None:
            seen = self.prefixes.get(key)
            if seen is not None and seen not in self.dead and self.load[seen] - self.load[g] <= AFFINITY_SLACK:
                g = seen
            if seen is None or seen in self.dead:
                self.prefixes[key] = g
            self.prefixes.move_to_end(key)
            if len(self.prefixes) > MAX_PREFIXES:
                self.prefixes.popitem(last=False)
        self.done([rid])  # a reused rid whose earlier run was aborted: count the new one only
        self.owner[rid] = g
        self.load[g] += 1
        self.served[g] += 1
        return g

    def done(self, rids: list[str]) -> None:
        for rid in rids:
            g = self.owner.pop(rid, None)
            if g is not None:
                self.load[g] = max(0, self.load[g] - 1)

    def group_down(self, g: int, reason: str) -> list[str]:
        """Stop routing to group ``g``; returns the rids it had in flight (to fail them)."""
        self.dead[g] = reason
        rids = [rid for rid, owner in self.owner.items() if owner == g]
        self.done(rids)
        return rids

    def state(self) -> list[dict[str, Any]]:
        return [{"dp_rank": g, "alive": g not in self.dead, "in_flight": self.load[g], "served": self.served[g],
                 "error": self.dead.get(g)} for g in range(len(self.load))]
