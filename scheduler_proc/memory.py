"""KV memory as the scheduler spends it: pages, request slots and the prefix cache, and the
estimate of what the running requests will still need, which admission must leave free.

Pages are taken as tokens need them (evicting unlocked cached pages when the free list runs
short) and given back when a request finishes or is retracted: its whole computed pages go into
the prefix cache, the rest to the allocator.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from treadle.runtime.server_args import ServerArgs
from treadle.scheduler_proc.kv_pool import PageAllocator, SlotAllocator
from treadle.scheduler_proc.lora_slots import LoraSlots
from treadle.scheduler_proc.radix_cache import NoPrefixCache, PrefixCache, RadixCache
from treadle.scheduler_proc.req import Req

FINISH_LAG_STEPS = 2  # steps from a request's last token being planned to its pages coming back (overlap)


def peak_growth(requests: list[tuple[int, int]]) -> int:
    """The most tokens a set of requests will hold beyond what they hold now, each given as
    ``(tokens it still makes, tokens it holds)`` and freeing all it holds once done: at step ``t``
    the ones still running have grown by ``t`` each and the finished ones have freed theirs, so
    the peak is at some request's last step."""
    peak, freed, n = 0, 0, len(requests)
    ordered = sorted(requests)
    for k, (remaining, held) in enumerate(ordered):
        if k == 0 or remaining != ordered[k - 1][0]:  # the first of equal lengths: all of them still run
            peak = max(peak, remaining * (n - k) - freed)
        freed += held
    return peak


class KvBudget:
    """Owns the page and slot allocators and the prefix cache (a ``NoPrefixCache`` when caching is
    off), and releases a request's LoRA slot with its KV."""

    def __init__(self, args: ServerArgs, max_total_tokens: int, max_slots: int, lora: LoraSlots,
                 prefix_caching: bool) -> None:
        self.page_size: int = args.page_size or 1
        self.pages = PageAllocator(max_total_tokens, self.page_size)
        self.slots = SlotAllocator(max_slots)
        self.cache: PrefixCache = (RadixCache(self.page_size, self.pages) if prefix_caching
                                   else NoPrefixCache(self.pages))
        self.lora = lora
        # Longest output first admits the requests whose growth new_token_ratio underestimates most:
        # there, requests of certain length are reserved their exact peak instead (decode_reserve)
        self.exact_reserve = args.schedule_policy == "lof"
        self.init_ratio = min(0.7 * args.schedule_conservativeness, 1.0)
        self.min_ratio = min(0.1 * args.schedule_conservativeness, self.init_ratio)
        self.new_token_ratio = self.init_ratio  # expected share of max_new_tokens still to come (admission)

    # ------------------------------------------------------------------ the estimate
    def available_pages(self) -> int:
        return self.pages.free_pages + self.cache.evictable_pages

    def decode_reserve(self, running: list[Req], candidate: Optional[Req] = None) -> int:
        """Pages the running requests are expected to still need: the rest of their prompts, and of
        their outputs ``new_token_ratio`` of what they may still make (SGLang's estimate), except, with
        ``lof``, for requests whose length is certain (``Req.ends_only_by_length``): those need the
        peak of their joint growth over the coming steps, net of what the ones that finish first
        free. A ``candidate`` for admission counts among those (its prompt is the caller's to charge).

        Why only with ``lof``: on the CI workload (one H100) the exact peak ended lof's retractions
        (47 in the schedule model, each a prompt run again) and made it 3.5% faster than fcfs, while
        under fcfs, where early finishers keep freeing pages, the ratio's optimism never retracted
        and its fuller pool was 1.1% faster than the exact peak."""
        tokens, certain = 0.0, []
        if candidate is not None and self.reserves_exact_peak(candidate):
            certain.append((candidate.remaining_tokens(), len(candidate.all_ids())))
        for r in running:
            tokens += max(0, r.prefill_end - r.num_computed)
            if self.reserves_exact_peak(r):
                certain.append((r.remaining_tokens(), r.num_tokens))
            else:
                tokens += r.remaining_tokens() * self.new_token_ratio
        lag = FINISH_LAG_STEPS * len(certain)  # the others keep growing while a finisher's pages come back
        return int((tokens + peak_growth(certain) + lag) / self.page_size) + len(running)

    def reserves_exact_peak(self, req: Req) -> bool:
        """Reserved its exact KV growth (with ``lof``; see ``exact_reserve``)."""
        return self.exact_reserve and req.ends_only_by_length()

    def decay_ratio(self) -> None:
        """Each planned step: trust that requests stop early a little more (down to ``min_ratio``)."""
        self.new_token_ratio = max(self.min_ratio, self.new_token_ratio - (self.init_ratio - self.min_ratio) / 600)

    def reset_ratio(self) -> None:
        """After a retraction: the estimate was too optimistic, start again from ``init_ratio``."""
        self.new_token_ratio = self.init_ratio

    # ------------------------------------------------------------------ taking and giving back
    @contextlib.contextmanager
    def hold(self, node: object) -> Iterator[None]:
        """Keep a matched prefix's node locked while a request is weighed for admission, so its
        pages stop counting as evictable (``available_pages``) and no page taken meanwhile evicts
        them; unlocked on leaving. An admitted request takes a lock of its own (``req.cache_node``)."""
        self.cache.lock(node)
        try:
            yield
        finally:
            self.cache.unlock(node)

    def take_pages(self, n: int) -> list[int]:
        if n > self.pages.free_pages:
            self.cache.evict(n - self.pages.free_pages)
        return self.pages.alloc(n)

    def grow(self, req: Req, num_tokens: int) -> None:
        """Give ``req`` the pages to hold ``num_tokens`` positions."""
        need = self.pages.pages_for(num_tokens) - len(req.pages)
        if need > 0:
            req.pages += self.take_pages(need)

    def free(self, req: Req) -> None:
        """Give a request's pages back: whole computed pages go into the prefix cache (which frees
        duplicates), the rest to the allocator; then its slot and its LoRA slot. Only positions whose
        token is known count: a step in flight may have computed the KV of a token that was then
        dropped (the request failed or was aborted meanwhile)."""
        k = min(req.num_computed, req.seq_len) // self.page_size
        if k >= req.shared_pages and k > 0:
            self.cache.insert(req.key_ids()[: k * self.page_size], req.pages[:k], req.cache_namespace)
        else:
            k = req.shared_pages
        self.cache.unlock(req.cache_node)
        self.pages.free(req.pages[k:])
        self.slots.free(req.slot)
        if req.lora_slot >= 0:
            self.lora.release(req.tokenized.lora_name)
        req.pages, req.shared_pages, req.cache_node, req.slot, req.lora_slot = [], 0, None, None, -1
        req.mm_sent.clear()  # a new slot: the worker has no embeddings for it
        req.num_computed = req.prefill_end = 0

    def check_idle(self) -> None:
        """At idle every page is free or owned by the prefix cache, and every request and LoRA slot is free."""
        assert self.pages.free_pages + self.cache.cached_pages == self.pages.num_pages, "KV page leak"
        assert self.slots.free_slots == self.slots.num_slots, "request slot leak"
        assert not any(self.lora.users.values()), "LoRA slot leak"
