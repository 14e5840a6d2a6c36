"""Radix (prefix) cache: a tree over token ids whose nodes own KV pages, so requests sharing a prompt
prefix reuse its KV instead of recomputing it.

Everything is page-granular (a node covers whole pages, ``page_size`` tokens each) because a page is
the smallest unit the allocator hands out and the attention kernels index; a partial page is never
shared. Eviction is LRU over unlocked leaves, via a lazily invalidated heap: entries are pushed whenever
a node becomes an evictable leaf or is touched, and stale ones are skipped on pop, which keeps each
eviction O(log n) without having to delete from the middle of a heap.

KV depends on more than the tokens when a LoRA adapter computed it, so every lookup names a
namespace (the adapter; ``""`` for the base model), and each namespace has a tree of its own.
They share the page pool and the LRU eviction.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Union

from treadle.scheduler_proc.kv_pool import PageAllocator


class TreeNode:
    """One edge of the radix tree; ``key`` and ``pages`` line up (``len(key) == len(pages) * page_size``).

    ``lock_ref`` counts the running requests that use this node or a descendant: a node in use by a
    request must keep its pages, and so must every ancestor (the request's prefix lies along the path)."""

    __slots__ = ("key", "pages", "children", "parent", "lock_ref", "last_access")

    def __init__(self, key: list[int], pages: list[int], parent: TreeNode | None, tick: int = 0) -> None:
        self.key = key
        self.pages = pages
        self.children: dict[tuple[int, ...], TreeNode] = {}  # keyed by the child's first page of tokens
        self.parent = parent
        self.lock_ref = 0
        self.last_access = tick


class RadixCache:
    def __init__(self, page_size: int, allocator: PageAllocator) -> None:
        self.page_size = page_size
        self.allocator = allocator
        self._tick = itertools.count(1)  # monotonic "clock": deterministic LRU order, unlike time.time()
        self._seq = itertools.count()  # heap tie-breaker, so TreeNodes are never compared
        self._init_tree()

    def _init_tree(self) -> None:
        self.roots: dict[str, TreeNode] = {}  # namespace -> its tree's root (made on first use)
        self._cached = self._locked = self._nodes = 0
        self._heap: list[tuple[int, int, TreeNode]] = []  # (last_access, seq, leaf); may hold stale entries

    # ---- counters (O(1): kept incrementally) ----
    @property
    def cached_pages(self) -> int:
        return self._cached

    @property
    def locked_pages(self) -> int:
        return self._locked

    @property
    def evictable_pages(self) -> int:
        """Pages that eviction could eventually free (every unlocked node's, leaves first)."""
        return self._cached - self._locked

    # ---- lookup / insert ----
    def _child(self, node: TreeNode, ids: list[int], pos: int) -> TreeNode | None:
        return node.children.get(tuple(ids[pos : pos + self.page_size]))

    def _common(self, key: list[int], ids: list[int], pos: int, end: int) -> int:
        """Tokens of ``key`` matching ``ids[pos:end]``, rounded down to whole pages."""
        lim, i = min(len(key), end - pos), 0
        while i < lim and key[i] == ids[pos + i]:
            i += 1
        return i - i % self.page_size

    def _split(self, node: TreeNode, n: int) -> TreeNode:
        """Cut ``node`` after ``n`` tokens; returns the new upper part (the lower keeps ``node``'s identity,
        so heap entries and request handles to it stay valid). Locks and page counts are unchanged:
        every lock on the lower part also passed through the upper part."""
        ps, parent = self.page_size, node.parent
        mid = TreeNode(node.key[:n], node.pages[: n // ps], parent, node.last_access)
        mid.lock_ref = node.lock_ref
        node.key, node.pages, node.parent = node.key[n:], node.pages[n // ps :], mid
        mid.children[tuple(node.key[:ps])] = node
        parent.children[tuple(mid.key[:ps])] = mid
        self._nodes += 1
        return mid

    def _touch(self, path: list[TreeNode]) -> None:
        tick = next(self._tick)
        for node in path:
            node.last_access = tick
        if path:
            self._push(path[-1])  # only the deepest node can be a leaf

    def _root(self, namespace: str) -> TreeNode:
        root = self.roots.get(namespace)
        if root is None:
            root = self.roots[namespace] = TreeNode([], [], None)
        return root

    def match_prefix(self, ids: list[int], max_len: int | None = None, namespace: str = ""
                     ) -> tuple[list[int], TreeNode]:
        """Longest cached prefix of ``ids`` in whole pages, at most ``max_len`` tokens (rounded down to a
        page): (its pages in order, the deepest node covering it; the root if nothing). Splits a node when
        the match ends inside it so the returned node covers exactly the match (callers lock that node).
        Updates last_access (LRU) along the path."""
        end = len(ids) if max_len is None else min(len(ids), max_len)
        end -= end % self.page_size
        node, pos, pages, path = self._root(namespace), 0, [], []
        while pos < end and (child := self._child(node, ids, pos)) is not None:
            n = self._common(child.key, ids, pos, end)
            if n < len(child.key):
                child = self._split(child, n)
            pages += child.pages
            path.append(child)
            node, pos = child, pos + n
        self._touch(path)
        return pages, node

    def insert(self, ids: list[int], pages: list[int], namespace: str = "") -> int:
        """Cache a sequence given in whole pages (``len(ids) == len(pages) * page_size``). Where a position
        is already cached under a different page, the given page is a duplicate (another request computed
        the same KV) and goes back to the allocator; the tree's copy wins. Returns the number of tokens
        that were already cached before this insert."""
        ps = self.page_size
        assert len(ids) == len(pages) * ps, f"{len(ids)} ids for {len(pages)} pages of {ps}"
        node, pos, path = self._root(namespace), 0, []
        while pos < len(ids):
            child = self._child(node, ids, pos)
            if child is None:
                child = TreeNode(ids[pos:], pages[pos // ps :], node)
                node.children[tuple(ids[pos : pos + ps])] = child
                self._cached += len(child.pages)
                self._nodes += 1
                path.append(child)
                break
            n = self._common(child.key, ids, pos, len(ids))
            if n < len(child.key) and pos + n < len(ids):
                child = self._split(child, n)  # diverges inside child: the rest hangs off the upper part
            dup = [p for p, q in zip(pages[pos // ps : (pos + n) // ps], child.pages) if p != q]
            if dup:
                self.allocator.free(dup)
            path.append(child)
            node, pos = child, pos + n
        self._touch(path)
        return pos

    # ---- locking ----
    def lock(self, node: TreeNode) -> None:
        """Pin ``node`` and its ancestors (root excluded) so their pages are never evicted."""
        while node.parent is not None:
            if node.lock_ref == 0:
                self._locked += len(node.pages)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: TreeNode) -> None:
        while node.parent is not None:
            assert node.lock_ref > 0, "unlock without a matching lock"
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._locked -= len(node.pages)
                self._push(node)
            node = node.parent

    # ---- eviction ----
    def _push(self, node: TreeNode) -> None:
        if node.parent is not None and not node.children and node.lock_ref == 0:
            heapq.heappush(self._heap, (node.last_access, next(self._seq), node))
            if len(self._heap) > 2 * self._nodes + 64:  # too many stale entries: rebuild from live leaves
                self._heap = [(n.last_access, next(self._seq), n) for n in self._walk() if self._evictable(n)]
                heapq.heapify(self._heap)

    def _evictable(self, node: TreeNode) -> bool:
        return node.parent is not None and not node.children and node.lock_ref == 0

    def evict(self, num_pages: int) -> int:
        """Free pages of unlocked leaves, least recently used first (a parent becomes a candidate once its
        children are gone), until ``num_pages`` are freed or nothing is evictable. Whole nodes go, so the
        result may exceed ``num_pages``; returns the pages freed."""
        freed = 0
        while freed < num_pages and self._heap:
            tick, _, node = heapq.heappop(self._heap)
            if tick != node.last_access or not self._evictable(node):
                continue  # stale entry: node was touched, locked, grew children or is already gone
            self.allocator.free(node.pages)
            freed += len(node.pages)
            self._cached -= len(node.pages)
            self._nodes -= 1
            parent = node.parent
            del parent.children[tuple(node.key[: self.page_size])]
            node.parent = None
            self._push(parent)
        return freed

    def reset(self) -> None:
        """Free every page and empty the tree; only legal when no request holds a lock."""
        assert self._locked == 0 and all(n.lock_ref == 0 for n in self._walk()), "reset with locked nodes"
        self.allocator.free([p for n in self._walk() for p in n.pages])
        self._init_tree()

    # ---- introspection ----
    def _walk(self) -> list[TreeNode]:
        out, stack = [], [c for root in self.roots.values() for c in root.children.values()]
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    def check(self) -> None:
        """Assert the tree's invariants and that the incremental counters match a full recount."""
        ps, nodes = self.page_size, self._walk()
        assert all(not r.key and not r.pages and r.lock_ref == 0 and r.parent is None for r in self.roots.values())
        live = {(id(n), t) for t, _, n in self._heap}
        for node in nodes:
            assert node.pages and len(node.key) == len(node.pages) * ps, "key/page length mismatch"
            assert node.parent.children.get(tuple(node.key[:ps])) is node, "bad child key or parent link"
            assert node.lock_ref >= sum(c.lock_ref for c in node.children.values()) >= 0, "bad lock_ref"
            if self._evictable(node):
                assert (id(node), node.last_access) in live, "evictable leaf missing from the heap"
        owned = [p for n in nodes for p in n.pages]
        assert len(owned) == len(set(owned)) == self._cached, "page owned twice or cached count off"
        assert self._locked == sum(len(n.pages) for n in nodes if n.lock_ref > 0), "locked count off"
        assert self._nodes == len(nodes), "node count off"


class NoPrefixCache:
    """The prefix cache when none is wanted (``disable_radix_cache``, or a bidirectional encoder, whose
    KV no later request can reuse): ``RadixCache``'s interface caching nothing, so the scheduler has no
    ``cache is None`` branches. Every lookup misses, and inserted pages go straight back to the
    allocator, as ``RadixCache.insert`` frees the duplicates it already holds."""

    cached_pages = locked_pages = evictable_pages = 0

    def __init__(self, allocator: PageAllocator) -> None:
        self.allocator = allocator

    def match_prefix(self, ids: list[int], max_len: int | None = None, namespace: str = ""
                     ) -> tuple[list[int], None]:
        return [], None  # no node: ``dfs_weight_order`` then keeps arrival order

    def insert(self, ids: list[int], pages: list[int], namespace: str = "") -> int:
        self.allocator.free(pages)
        return 0

    def lock(self, node: None) -> None:
        pass

    def unlock(self, node: None) -> None:
        pass

    def evict(self, num_pages: int) -> int:
        return 0

    def reset(self) -> None:
        pass

    def check(self) -> None:
        pass


PrefixCache = Union[RadixCache, NoPrefixCache]
