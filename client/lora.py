"""The client's side of LoRA: which adapter names are loaded, checking a call's ``lora_path``, and
the ``max_loaded_loras`` bound, kept as SGLang's tokenizer manager keeps it.

The ``Engine`` is the only producer of requests, so checking names here, before anything is sent,
is complete: a request naming an adapter that was never loaded (or was unloaded) fails with a
``ValueError`` and never reaches the other processes. The scheduler keeps its own table of what the
workers hold (``scheduler_proc/lora_slots.py``) and refuses unknown names too.

``max_loaded_loras``: loading past it unloads the least recently used unpinned adapter (a request
naming an adapter counts as a use), as SGLang does; when every other adapter is pinned the load
fails and nothing changes. An adapter unloaded that way keeps its path here, and the next request
that names it loads it again before it is sent (``Reloading evicted adapter``), possibly evicting
another. An adapter the user unloads is forgotten, as SGLang forgets it. Unloading is deferred on
the workers: requests already sent that use the adapter still finish with it.

Load, unload and reload run one at a time (a lock): a reload is a blocking control call, which
``reload_evicted_async`` moves off the caller's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from typing import Any, Iterable, Optional, Union

from treadle.client.control import Control
from treadle.runtime.lora_args import LORA_NOT_ENABLED as NOT_ENABLED

logger = logging.getLogger("treadle.engine")


class LoRAUpdateOutput:
    """What ``load_lora_adapter``/``unload_lora_adapter`` return (errors are returned, not raised, as SGLang)."""

    def __init__(self, success: bool, error_message: Optional[str] = None,
                 loaded_adapters: Optional[dict[str, str]] = None) -> None:
        self.success, self.error_message, self.loaded_adapters = success, error_message, loaded_adapters

    def __bool__(self) -> bool:
        return self.success

    def __repr__(self) -> str:
        return (f"LoRAUpdateOutput(success={self.success}, error_message={self.error_message!r}, "
                f"loaded_adapters={self.loaded_adapters!r})")


class LoraRegistry:
    """Adapter names the engine has loaded, as the user sees them (``load_lora_adapter``)."""

    def __init__(self, enabled: bool, max_loaded: Optional[int] = None, control: Optional[Control] = None) -> None:
        self.enabled = enabled
        self.max_loaded = max_loaded
        self.control = control  # the engine's control calls (None: a registry that never loads, in tests)
        self.paths: OrderedDict[str, str] = OrderedDict()  # loaded adapters, least recently used first
        self.pinned: set[str] = set()
        self.evicted: dict[str, str] = {}  # name -> path of the (unpinned) adapters max_loaded_loras unloaded
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ load / unload
    def load(self, lora_name: Any, lora_path: Any, pinned: bool = False,
             keep: Iterable[str] = ()) -> LoRAUpdateOutput:
        """Load on every DP group; if one group fails, the groups that loaded it drop it again, so
        they agree. Past ``max_loaded_loras`` the least recently used unpinned adapters not in
        ``keep`` are unloaded once the new one has loaded."""
        with self._lock:
            why = self._why_not(lora_name, lora_path)
            victims = [] if why is not None else self._victims(1, {lora_name, *keep})
            if victims is None:
                why = (f"Cannot load LoRA adapter {lora_name}: max_loaded_loras={self.max_loaded} adapters are "
                       "loaded and none can be unloaded to make room (pinned, or used by this call).")
            if why is not None:
                return LoRAUpdateOutput(False, why, dict(self.paths))
            results = self.control.load_lora_adapter(lora_name, lora_path, bool(pinned))
            failed = [r for r in results.values() if not r.get("success")]
            if failed:
                ok = [g for g, r in results.items() if r.get("success")]
                if ok:
                    self.control.unload_lora_adapter(lora_name, ok)
                return LoRAUpdateOutput(False, failed[0].get("error_message"), dict(self.paths))
            self.paths[lora_name] = lora_path
            self.pinned.discard(lora_name)
            if pinned:
                self.pinned.add(lora_name)
            self.evicted.pop(lora_name, None)
            for name in victims:
                logger.info("unloading the least recently used LoRA adapter %r (max_loaded_loras=%d)",
                            name, self.max_loaded)
                self.evicted[name] = self.paths[name]
                self._drop(name)
            return LoRAUpdateOutput(True, None, dict(self.paths))

    def unload(self, lora_name: Any) -> LoRAUpdateOutput:
        """Unload and forget the adapter (an evicted one is forgotten: no request reloads it)."""
        with self._lock:
            if lora_name in self.evicted:
                del self.evicted[lora_name]
                return LoRAUpdateOutput(True, None, dict(self.paths))
            if lora_name not in self.paths:
                return LoRAUpdateOutput(False, f"LoRA with name {lora_name} does not exist. Loaded LoRAs: "
                                               f"{sorted(self.paths)}", dict(self.paths))
            self._drop(lora_name)
            return LoRAUpdateOutput(True, None, dict(self.paths))

    def _drop(self, name: str) -> None:
        del self.paths[name]
        self.pinned.discard(name)
        self.control.unload_lora_adapter(name)

    def _victims(self, room: int, keep: set[str]) -> Optional[list[str]]:
        """The adapters to unload so that ``room`` more fit under ``max_loaded_loras``: the least
        recently used unpinned ones outside ``keep``; None if there are not enough of them."""
        excess = 0 if self.max_loaded is None else len(self.paths) + room - self.max_loaded
        if excess <= 0:
            return []
        idle = [n for n in self.paths if n not in self.pinned and n not in keep]
        return idle[:excess] if len(idle) >= excess else None

    def _why_not(self, lora_name: Any, lora_path: Any) -> Optional[str]:
        """Why a load can't be tried (an error message), or None."""
        if not isinstance(lora_name, str) or not lora_name:
            return "lora_name must be a non-empty string."
        if not isinstance(lora_path, str) or not lora_path:
            return "lora_path must be a non-empty string (an adapter directory)."
        if not self.enabled:
            return NOT_ENABLED
        if lora_name in self.paths:
            return f"The LoRA adapter {lora_name} is already loaded. Unload it first or use another name."
        return None

    # ------------------------------------------------------------------ requests
    def resolve(self, lora_path: Any) -> Union[None, str, list[Optional[str]]]:
        """Check a call's ``lora_path`` (a name, a list of names / None per prompt, or None) and
        return it as the requests will carry it; raises ``ValueError``/``TypeError`` naming it.
        Its adapters become the most recently used; evicted ones are loaded again first."""
        if lora_path is None:
            return None
        names = lora_path if isinstance(lora_path, list) else [lora_path]
        for name in names:
            if name is not None and not isinstance(name, str):
                raise TypeError(f"lora_path must be an adapter name, a list of names (or None), got {name!r}.")
        wanted = list(dict.fromkeys(n for n in names if n is not None))
        if wanted and not self.enabled:
            raise ValueError(f"LoRA adapter '{wanted[0]}' was requested, but {NOT_ENABLED}")
        if self.max_loaded is not None and len(wanted) > self.max_loaded:
            raise ValueError(f"lora_path names {len(wanted)} different adapters, but max_loaded_loras is "
                             f"{self.max_loaded}.")
        with self._lock:
            unknown = [n for n in wanted if n not in self.paths and n not in self.evicted]
            if unknown:
                raise ValueError(f"Got LoRA adapter that has never been loaded: {unknown[0]}\n"
                                 f"All loaded adapters: {sorted(self.paths)}.")
            for name in wanted:
                if name in self.paths:
                    self.paths.move_to_end(name)
            for name in wanted:
                if name in self.evicted:
                    self._reload(name, wanted)
        return lora_path

    def _reload(self, name: str, keep: list[str]) -> None:
        logger.info("Reloading evicted adapter: %s", name)
        res = self.load(name, self.evicted[name], keep=keep)
        if not res.success:
            raise ValueError(f"Failed to implicitly load LoRA adapter {name}: {res.error_message}")

    async def reload_evicted_async(self, lora_path: Any) -> None:
        """Load the evicted adapters a call names on a thread, so a caller's event loop never
        waits on the workers reading them (``resolve`` then finds them loaded)."""
        names = lora_path if isinstance(lora_path, list) else [lora_path]
        if any(isinstance(n, str) and n in self.evicted for n in names):
            await asyncio.to_thread(self.resolve, lora_path)
