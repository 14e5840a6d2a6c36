"""Which LoRA adapters sit in the workers' device slots, and which running requests use them.

The workers keep every loaded adapter in host memory and compute with at most ``num_slots``
(``max_loras_per_batch``) of them on the device at once; the base model needs no slot. A request
takes its adapter's slot when it is admitted and gives it back when its KV is freed (finished or
retracted). An adapter that no running request uses may lose its slot to another one (the least
recently used, or with ``lora_eviction_policy="fifo"`` the longest resident): the plan
of the step that needs the slot carries a ``LoraLoad``, which the worker applies before running
that step (in stream order, so steps already launched still see the old adapter).

Unloading is deferred as SGLang's is: the client stops sending requests for the name at once,
and the workers drop the adapter once no queued or running request refers to it. Loading it again
from the same path before then (the client reloads an adapter that ``max_loaded_loras`` evicted
when a request names it) only cancels the unloading: the workers still hold it.
"""

from __future__ import annotations

import itertools
from typing import Iterable, Optional

from treadle.runtime.messages import LoraLoad


class LoraSlots:
    def __init__(self, num_slots: int, policy: str = "lru") -> None:
        self.num_slots = num_slots
        self.policy = policy
        self.loaded: dict[str, str] = {}  # adapters the workers hold (host memory): name -> path
        self.pinned: set[str] = set()  # keep their device slot once they have one
        self.slot_of: dict[str, int] = {}  # adapters resident in a device slot
        self.users: dict[str, int] = {}  # running requests per resident adapter
        self.last_use: dict[str, int] = {}
        self.resident_since: dict[str, int] = {}
        self.unloading: set[str] = set()
        self.loads: list[LoraLoad] = []  # slot fills for the next plan
        self._tick = itertools.count()

    def load(self, name: str, path: str, pinned: bool = False) -> None:
        """The workers hold ``name`` now (read, or still held while it was being unloaded)."""
        self.loaded[name] = path
        self.unloading.discard(name)
        if pinned:
            self.pinned.add(name)
        else:
            self.pinned.discard(name)

    def still_held(self, name: str) -> Optional[str]:
        """The path of ``name`` if it is being unloaded but the workers still hold it (requests
        that use it have not finished): loading it again from that path needs no read."""
        return self.loaded.get(name) if name in self.unloading else None

    def serves(self, name: str) -> bool:
        """Loaded and not being unloaded: new requests may name it."""
        return name in self.loaded and name not in self.unloading

    def serving(self) -> dict[str, str]:
        """The adapters new requests may name, with their paths (``loaded_adapters``)."""
        return {n: p for n, p in self.loaded.items() if n not in self.unloading}

    def acquire(self, name: str) -> Optional[int]:
        """The device slot for a request of adapter ``name`` (filled by the next plan if it was not
        resident), or None while every slot is held by adapters that running requests use."""
        slot = self.slot_of.get(name)
        if slot is None:
            slot = self._free_slot()
            if slot is None:
                return None
            self.slot_of[name] = slot
            self.resident_since[name] = next(self._tick)
            self.loads.append(LoraLoad(slot, name))
        self.users[name] = self.users.get(name, 0) + 1
        self.last_use[name] = next(self._tick)
        return slot

    def _free_slot(self) -> Optional[int]:
        taken = set(self.slot_of.values())
        free = [s for s in range(self.num_slots) if s not in taken]
        if free:
            return free[0]
        idle = [n for n in self.slot_of if not self.users.get(n) and n not in self.pinned]
        if not idle:
            return None
        age = self.resident_since if self.policy == "fifo" else self.last_use
        victim = min(idle, key=lambda n: age.get(n, -1))
        return self.slot_of.pop(victim)

    def release(self, name: str) -> None:
        self.users[name] -= 1

    def take_loads(self) -> list[LoraLoad]:
        loads, self.loads = self.loads, []
        return loads

    def unload(self, name: str) -> None:
        """Mark ``name`` for unloading; ``finish_unloads`` drops it once nothing refers to it."""
        self.unloading.add(name)

    def finish_unloads(self, in_use: Iterable[Optional[str]]) -> list[str]:
        """The adapters marked for unloading that no request in ``in_use`` names any more: they
        leave the slots and the loaded set; the caller tells the workers."""
        if not self.unloading:
            return []
        busy = set(in_use)
        done = [n for n in self.unloading if n not in busy]
        for name in done:
            self.unloading.discard(name)
            self.loaded.pop(name, None)
            self.pinned.discard(name)
            self.slot_of.pop(name, None)
            self.users.pop(name, None)
            self.last_use.pop(name, None)
            self.resident_since.pop(name, None)
            self.loads = [ld for ld in self.loads if ld.name != name]
        return done
