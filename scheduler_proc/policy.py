"""Waiting-queue order, as SGLang's ``schedule_policy`` names it:

- ``fcfs``: arrival order (retracted requests first);
- ``lpm``: longest cached prefix first;
- ``dfs-weight``: depth first over the radix tree, the branch with the most waiting requests first,
  so requests that share a prefix run together (each waiting request sits at the node its cached
  prefix ends on);
- ``lof``: longest output (``max_new_tokens``) first: long requests start early instead of being
  the last ones running, the few-row tail of an offline batch;
- ``random``: a fresh shuffle every step (seeded by ``random_seed``);
- ``priority``: priority order alone.

``lpm`` and ``dfs-weight`` match every waiting request against the cache, so with more than
``LPM_MAX_QUEUE`` waiting they fall back to ``fcfs``, as SGLang's do. With
``enable_priority_scheduling`` the queue is ordered by priority first (higher runs first; a request
without one is the least important), then by the policy.
"""

from __future__ import annotations

import collections
import random
from typing import Any, Callable

from treadle.scheduler_proc.req import Req

LPM_MAX_QUEUE = 128  # beyond this, matching every waiting request each step costs too much (as SGLang)
LOWEST_PRIORITY = -(2**62)


def priority_of(req: Req) -> int:
    return LOWEST_PRIORITY if req.tokenized.priority is None else req.tokenized.priority


def order_waiting(waiting: list[Req], policy: str, priority: bool, match: Callable[[Req], tuple[list[int], Any]],
                  rng: random.Random) -> list[Req]:
    """The queue in admission order (``waiting`` is in arrival order, retracted requests first).
    ``match``: a request's cached prefix, as ``(its pages, the radix node it ends on)`` (``([],
    None)`` without a cache)."""
    small = len(waiting) <= LPM_MAX_QUEUE
    if policy == "lpm" and small:
        lengths = {id(r): len(match(r)[0]) for r in waiting}
        key = (lambda r: -lengths[id(r)])
    elif policy == "lof":
        key = (lambda r: -r.max_new_tokens)
    elif (policy == "dfs-weight" and small) or policy == "random":
        if policy == "random":
            order = rng.sample(waiting, len(waiting))
        else:
            order = dfs_weight_order(waiting, lambda r: match(r)[1])
        rank = {id(r): i for i, r in enumerate(order)}
        key = (lambda r: rank[id(r)])
    else:
        key = (lambda r: 0)  # stable sort keeps arrival order
    return sorted(waiting, key=(lambda r: (-priority_of(r), key(r))) if priority else key)


def dfs_weight_order(waiting: list[Req], match_node: Callable[[Req], Any]) -> list[Req]:
    """SGLang's ``dfs-weight``: a node's weight is the number of waiting requests whose cached
    prefix ends in its subtree; visit children heaviest first (ties in the tree's order), a node's
    own requests after its subtree's. Only the paths from the requests' nodes up are walked."""
    at: dict[Any, list[Req]] = collections.defaultdict(list)
    weight: collections.Counter = collections.Counter()
    roots: list[Any] = []  # one tree per cache namespace, in first-seen order
    for r in waiting:
        node = match_node(r)
        if node is None:  # no cache: arrival order
            return list(waiting)
        at[node].append(r)
        while node.parent is not None:
            weight[node] += 1
            node = node.parent
        weight[node] += 1
        if node not in roots:
            roots.append(node)
    out: list[Req] = []
    stack: list[tuple[Any, bool]] = [(root, False) for root in reversed(roots)]
    while stack:  # iterative post-order: a long chain of nodes must not hit the recursion limit
        node, expanded = stack.pop()
        if expanded:
            out.extend(at[node])
            continue
        stack.append((node, True))
        children = sorted((c for c in node.children.values() if weight[c]), key=lambda c: -weight[c])
        stack.extend((c, False) for c in reversed(children))
    return out
