"""Waiting-queue order: ``fcfs``, ``lpm`` (longest cached prefix first) and priority.

With ``enable_priority_scheduling`` the queue is ordered by priority first (higher runs first;
a request without one is the least important), then by the policy.
"""

from __future__ import annotations

from typing import Callable

from treadle.scheduler_proc.req import Req

LPM_MAX_QUEUE = 128  # beyond this, matching every waiting request each step costs too much (as SGLang)
LOWEST_PRIORITY = -(2**62)


def priority_of(req: Req) -> int:
    return LOWEST_PRIORITY if req.tr.priority is None else req.tr.priority


def order_waiting(waiting: list[Req], policy: str, priority: bool, prefix_len: Callable[[Req], int]) -> list[Req]:
    """The queue in admission order (``waiting`` is in arrival order, retracted requests first)."""
    if policy == "lpm" and len(waiting) <= LPM_MAX_QUEUE:
        lengths = {id(r): prefix_len(r) for r in waiting}
        key = (lambda r: -lengths[id(r)])
    else:
        key = (lambda r: 0)  # stable sort keeps arrival order
    if priority:
        return sorted(waiting, key=lambda r: (-priority_of(r), key(r)))
    return sorted(waiting, key=key) if policy == "lpm" else list(waiting)
