"""An approximate prefix tree of the text each worker has been sent, as SGLang's router keeps one.

It guesses what each worker's radix cache holds without asking it: every routed request's text
is inserted for the worker it went to, and a new request's longest match tells which worker
probably has its prefix cached. Text, not tokens: the router never tokenizes. One tree for all
workers; each node remembers which workers hold it and when each last used it, so that a
worker over ``max_chars`` loses its least recently used leaves first (as its radix cache would).
"""

from __future__ import annotations

import itertools
from typing import Optional


class _Node:
    __slots__ = ("children", "text", "parent", "last_used")

    def __init__(self, text: str, parent: Optional["_Node"]) -> None:
        self.children: dict[str, _Node] = {}  # by first character
        self.text = text
        self.parent = parent
        self.last_used: dict[str, int] = {}   # worker -> tick of last use


def _common(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixTree:
    """``insert(text, worker)``, ``match(text) -> {worker: matched chars}``, ``size(worker)``."""

    def __init__(self, max_chars: int = 4_000_000) -> None:
        self.root = _Node("", None)
        self.max_chars = max_chars
        self.sizes: dict[str, int] = {}
        self._tick = itertools.count(1)

    def size(self, worker: str) -> int:
        return self.sizes.get(worker, 0)

    def insert(self, text: str, worker: str) -> None:
        tick = next(self._tick)
        node, rest = self.root, text
        while rest:
            child = node.children.get(rest[0])
            if child is None:
                child = _Node(rest, node)
                node.children[rest[0]] = child
            else:
                n = _common(child.text, rest)
                if n < len(child.text):
                    child = self._split(child, n)
            if worker not in child.last_used:
                self.sizes[worker] = self.sizes.get(worker, 0) + len(child.text)
            child.last_used[worker] = tick
            node, rest = child, rest[len(child.text):]
        if self.sizes.get(worker, 0) > self.max_chars:
            self.evict(worker, self.max_chars)

    def _split(self, child: _Node, n: int) -> _Node:
        """Cut ``child`` after ``n`` characters; the new upper node keeps its workers."""
        upper = _Node(child.text[:n], child.parent)
        upper.last_used = dict(child.last_used)
        assert child.parent is not None
        child.parent.children[upper.text[0]] = upper
        child.text = child.text[n:]
        child.parent = upper
        upper.children[child.text[0]] = child
        return upper

    def match(self, text: str) -> dict[str, int]:
        """For each worker holding some prefix of ``text``: how many characters of it."""
        out: dict[str, int] = {}
        node, rest, depth = self.root, text, 0
        while rest:
            child = node.children.get(rest[0])
            if child is None:
                break
            n = _common(child.text, rest)
            for w in child.last_used:
                out[w] = depth + n
            if n < len(child.text):
                break
            node, rest, depth = child, rest[n:], depth + n
        return out

    def remove_worker(self, worker: str) -> None:
        """Forget all a worker holds (it restarted: its cache is empty)."""
        self.evict(worker, 0)

    def evict(self, worker: str, target: int) -> None:
        """Drop the worker's least recently used leaves until it holds at most ``target`` chars."""
        leaves = [n for n in self._nodes() if worker in n.last_used
                  and not any(worker in c.last_used for c in n.children.values())]
        leaves.sort(key=lambda n: n.last_used[worker])
        while leaves and self.sizes.get(worker, 0) > target:
            node = leaves.pop(0)
            del node.last_used[worker]
            self.sizes[worker] -= len(node.text)
            parent = node.parent
            if not node.last_used and not node.children and parent is not None:
                del parent.children[node.text[0]]
            if parent is not None and parent is not self.root and worker in parent.last_used \
                    and not any(worker in c.last_used for c in parent.children.values()):
                # the parent is a leaf for this worker now; keep the list in LRU order
                leaves.append(parent)
                leaves.sort(key=lambda n: n.last_used[worker])

    def _nodes(self) -> list[_Node]:
        out, todo = [], list(self.root.children.values())
        while todo:
            node = todo.pop()
            out.append(node)
            todo.extend(node.children.values())
        return out
