"""KV memory bookkeeping: pages of ``page_size`` token slots, and request slots (table rows).

The scheduler only hands out indices; the worker owns the tensors they index.
"""

from __future__ import annotations

from collections import deque


class PageAllocator:
    """A free list of KV pages; page ``p`` covers token locations ``p*page_size .. +page_size-1``."""

    def __init__(self, num_tokens: int, page_size: int) -> None:
        self.page_size = page_size
        self.num_pages = num_tokens // page_size
        self._free: deque[int] = deque(range(self.num_pages))

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def alloc(self, num_pages: int) -> list[int]:
        if num_pages > len(self._free):
            raise MemoryError(f"asked for {num_pages} KV pages, {len(self._free)} free")
        return [self._free.popleft() for _ in range(num_pages)]

    def free(self, pages: list[int]) -> None:
        self._free.extend(pages)


class SlotAllocator:
    """Rows of the worker's req-to-token table, one per running request."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._free: deque[int] = deque(range(num_slots))

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def alloc(self) -> int:
        return self._free.popleft()

    def free(self, slot: int) -> None:
        self._free.append(slot)
