"""RadixCache: page-granular prefix matching, duplicate-page freeing on insert, lock/unlock, LRU eviction
and counter bookkeeping, checked against the PageAllocator's free count."""

from __future__ import annotations

import random

import pytest

from treadle.scheduler_proc.kv_pool import PageAllocator
from treadle.scheduler_proc.radix_cache import NoPrefixCache, RadixCache


def make(page_size: int, num_pages: int = 64) -> tuple[RadixCache, PageAllocator]:
    alloc = PageAllocator(num_pages * page_size, page_size)
    return RadixCache(page_size, alloc), alloc


def cache_seq(cache: RadixCache, alloc: PageAllocator, ids: list[int]) -> list[int]:
    """Alloc pages for the whole pages of ids and insert them; returns the pages passed."""
    pages = alloc.alloc(len(ids) // cache.page_size)
    cache.insert(ids[: len(pages) * cache.page_size], pages)
    return pages


def assert_conserved(cache: RadixCache, alloc: PageAllocator, held: int = 0) -> None:
    cache.check()
    assert alloc.free_pages + cache.cached_pages + held == alloc.num_pages


@pytest.mark.parametrize("ps", [1, 4])
def test_empty_tree(ps):
    cache, alloc = make(ps)
    pages, node = cache.match_prefix(list(range(10)))
    assert pages == [] and node is cache.roots[""]
    assert cache.cached_pages == cache.locked_pages == cache.evictable_pages == 0
    assert cache.evict(5) == 0
    assert cache.insert([], []) == 0
    assert_conserved(cache, alloc)


@pytest.mark.parametrize("ps", [1, 4])
def test_full_and_partial_match_splits(ps):
    cache, alloc = make(ps)
    ids = list(range(100, 100 + 4 * ps))
    pages = cache_seq(cache, alloc, ids)
    got, node = cache.match_prefix(ids)
    assert got == pages and node.key == ids
    # A query diverging after 2 pages (plus a partial third page) matches exactly 2 pages and splits.
    query = ids[: 2 * ps] + [7] * (ps + 1)
    got, mid = cache.match_prefix(query)
    assert got == pages[:2] and mid.key == ids[: 2 * ps] and mid.pages == pages[:2]
    assert list(mid.children.values())[0].pages == pages[2:]
    assert cache.cached_pages == 4
    assert_conserved(cache, alloc)
    # Still a full match after the split, through both halves.
    assert cache.match_prefix(ids + [1, 2, 3])[0] == pages


def test_page_alignment():
    cache, alloc = make(4)
    ids = list(range(10))
    pages = alloc.alloc(2)  # callers pass whole pages only: 8 of the 10 tokens
    with pytest.raises(AssertionError):
        cache.insert(ids, pages)
    assert cache.insert(ids[:8], pages) == 0
    assert cache.cached_pages == 2
    got, _ = cache.match_prefix(ids)
    assert got == pages
    assert cache.match_prefix(ids[:7])[0] == pages[:1]  # a partial page never matches
    assert cache.match_prefix([0, 1, 2])[0] == []
    assert_conserved(cache, alloc)


@pytest.mark.parametrize("ps", [1, 4])
def test_max_len_caps_match(ps):
    cache, alloc = make(ps)
    ids = list(range(6 * ps))
    pages = cache_seq(cache, alloc, ids)
    assert cache.match_prefix(ids, max_len=3 * ps)[0] == pages[:3]
    assert cache.match_prefix(ids, max_len=3 * ps + ps - 1)[0] == pages[:3]  # rounded down to a page
    assert cache.match_prefix(ids, max_len=0) == ([], cache.roots[""])
    assert_conserved(cache, alloc)


@pytest.mark.parametrize("ps", [1, 4])
def test_shared_prefix_reuses_nodes_and_frees_duplicates(ps):
    cache, alloc = make(ps)
    a = list(range(4 * ps))
    pa = cache_seq(cache, alloc, a)
    b = a[: 2 * ps] + [999] * (3 * ps)
    pb = alloc.alloc(5)  # recomputed the shared 2 pages: those are duplicates
    free_before = alloc.free_pages
    assert cache.insert(b, pb) == 2 * ps
    assert alloc.free_pages == free_before + 2
    assert cache.cached_pages == 4 + 3
    assert cache.match_prefix(b)[0] == pa[:2] + pb[2:]
    assert cache.match_prefix(a)[0] == pa
    # Re-inserting with the tree's own pages frees nothing; a fully cached insert reports all tokens.
    free_before = alloc.free_pages
    assert cache.insert(a, list(pa)) == 4 * ps
    assert alloc.free_pages == free_before
    assert_conserved(cache, alloc)


@pytest.mark.parametrize("ps", [1, 4])
def test_lock_protects_node_and_ancestors(ps):
    cache, alloc = make(ps)
    a = list(range(4 * ps))
    cache_seq(cache, alloc, a)
    cache_seq(cache, alloc, a[: 2 * ps] + [50] * (2 * ps))  # splits a after 2 pages
    _, node = cache.match_prefix(a)
    cache.lock(node)
    assert cache.locked_pages == 4 and cache.evictable_pages == 2
    assert cache.evict(100) == 2  # only the unlocked sibling leaf goes; locked ancestor stays
    assert cache.match_prefix(a)[0] and cache.cached_pages == 4
    assert_conserved(cache, alloc)
    cache.unlock(node)
    assert cache.locked_pages == 0
    with pytest.raises(AssertionError):
        cache.unlock(node)
    assert cache.evict(100) == 4 and cache.cached_pages == 0
    assert alloc.free_pages == alloc.num_pages
    cache.check()


@pytest.mark.parametrize("ps", [1, 4])
def test_evict_lru_leaves_then_parents(ps):
    cache, alloc = make(ps)
    base = [1] * (2 * ps)
    x, y, z = base + [2] * ps, base + [3] * ps, [9] * ps
    for s in (x, y, z):
        cache_seq(cache, alloc, s)
    cache.match_prefix(x)  # x (and base) now most recent; y is the LRU leaf, then z
    assert cache.evict(1) == 1
    assert cache.match_prefix(y, max_len=len(y))[0] == cache.match_prefix(base)[0]  # y's tail gone
    # base was just touched; z is now oldest, then x, then base (once it became a leaf).
    cache.match_prefix(x)
    assert cache.evict(1) == 1 and cache.match_prefix(z)[0] == []
    assert cache.evict(1) == 1 and len(cache.match_prefix(x)[0]) == 2
    assert cache.evict(2) == 2 and cache.cached_pages == 0
    assert_conserved(cache, alloc)


@pytest.mark.parametrize("ps", [1, 4])
def test_reset_frees_everything(ps):
    cache, alloc = make(ps)
    cache_seq(cache, alloc, list(range(3 * ps)))
    cache_seq(cache, alloc, [7] * (2 * ps))
    _, node = cache.match_prefix([7] * (2 * ps))
    cache.lock(node)
    with pytest.raises(AssertionError):
        cache.reset()
    cache.unlock(node)
    cache.reset()
    assert cache.cached_pages == 0 and alloc.free_pages == alloc.num_pages
    assert cache.match_prefix(list(range(3 * ps))) == ([], cache.roots[""])
    cache.check()


@pytest.mark.parametrize("ps", [1, 4])
def test_randomized_conservation(ps):
    """Requests match, lock, allocate the rest, then insert and unlock, interleaved with bare matches and
    evictions: counters stay exact and no page is lost or double-owned."""
    rng = random.Random(ps)
    cache, alloc = make(ps, num_pages=48)
    prefixes = [[rng.randrange(3) for _ in range(rng.randrange(0, 6 * ps))] for _ in range(4)]
    live: list[tuple[list[int], list[int], object, list[int]]] = []  # (ids, prefix pages, node, own pages)
    for _ in range(500):
        op = rng.random()
        if op < 0.35:
            ids = rng.choice(prefixes) + [rng.randrange(3) for _ in range(rng.randrange(1, 5 * ps))]
            pre, node = cache.match_prefix(ids, max_len=rng.choice([None, len(ids) - 1]))
            cache.lock(node)
            need = alloc.pages_for(len(ids)) - len(pre)
            if need > alloc.free_pages:
                cache.evict(need - alloc.free_pages)
            if need > alloc.free_pages:
                cache.unlock(node)  # out of memory: the request waits (dropped here)
            else:
                live.append((ids, pre, node, alloc.alloc(need)))
        elif op < 0.65 and live:
            ids, pre, node, own = live.pop(rng.randrange(len(live)))
            full = len(ids) // ps
            pages = pre + own
            alloc.free(pages[full:])  # the partial last page is the request's, never cached
            cache.insert(ids[: full * ps], pages[:full])
            cache.unlock(node)
        elif op < 0.8:
            cache.match_prefix(rng.choice(prefixes) + [rng.randrange(3)] * rng.randrange(3 * ps))
        else:
            before = cache.evictable_pages
            freed = cache.evict(rng.randrange(1, 8))
            assert freed <= before and cache.evictable_pages == before - freed
        assert_conserved(cache, alloc, held=sum(len(r[3]) for r in live))
        assert cache.locked_pages + cache.evictable_pages == cache.cached_pages
    for ids, pre, node, own in live:
        alloc.free(own)
        cache.unlock(node)
    cache.reset()
    assert alloc.free_pages == alloc.num_pages
    cache.check()


def test_stale_heap_entries_are_compacted():
    """Every touch of a leaf pushes a fresh heap entry; stale ones must not pile up without bound."""
    cache, alloc = make(1)
    cache_seq(cache, alloc, [1, 2, 3])
    cache_seq(cache, alloc, [4, 5])
    for _ in range(500):
        cache.match_prefix([1, 2, 3])
    assert len(cache._heap) <= 2 * 2 + 64 + 1
    cache.check()
    assert cache.evict(2) == 2 and cache.match_prefix([1, 2, 3])[0]  # [4, 5] is LRU despite the churn
    assert_conserved(cache, alloc)


@pytest.mark.parametrize("ps", [1, 4])
def test_namespaces_keep_adapters_apart(ps):
    """KV a LoRA adapter computed is found only under its namespace; eviction and the counters span all."""
    cache, alloc = make(ps, num_pages=16)
    ids = list(range(4 * ps))
    base = cache_seq(cache, alloc, ids)
    lora_pages = alloc.alloc(4)
    cache.insert(ids, lora_pages, namespace="math")
    assert cache.match_prefix(ids)[0] == base
    assert cache.match_prefix(ids, namespace="math")[0] == lora_pages
    assert cache.match_prefix(ids, namespace="code") == ([], cache.roots["code"])
    _, node = cache.match_prefix(ids, namespace="math")
    cache.lock(node)
    assert cache.cached_pages == 8 and cache.locked_pages == 4
    assert cache.evict(8) == 4  # only the base model's unlocked pages go
    assert cache.match_prefix(ids)[0] == [] and cache.match_prefix(ids, namespace="math")[0] == lora_pages
    cache.unlock(node)
    assert_conserved(cache, alloc)
    cache.reset()
    assert cache.cached_pages == 0 and alloc.free_pages == alloc.num_pages


def test_no_prefix_cache_misses_and_gives_inserted_pages_back():
    """``NoPrefixCache`` (caching off): every lookup misses with no node (so ``dfs-weight`` keeps
    arrival order), an insert frees its pages in order, and locks and eviction do nothing."""
    alloc = PageAllocator(16, 4)
    cache = NoPrefixCache(alloc)
    assert cache.match_prefix(list(range(12)), max_len=8, namespace="x") == ([], None)
    pages = alloc.alloc(3)
    assert cache.insert(list(range(12)), pages) == 0
    assert alloc.free_pages == 4 and list(alloc._free)[-3:] == pages
    cache.lock(None)
    cache.unlock(None)
    assert cache.evict(2) == 0 and alloc.free_pages == 4
    assert cache.cached_pages == cache.locked_pages == cache.evictable_pages == 0
    cache.reset()
    cache.check()
