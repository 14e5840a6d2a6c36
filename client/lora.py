"""The client's side of LoRA: which adapter names are loaded, and checking a call's ``lora_path``.

The ``Engine`` is the only producer of requests, so checking names here, before anything is sent,
is complete: a request naming an adapter that was never loaded (or is being unloaded) fails with a
``ValueError`` and never reaches the other processes. The scheduler keeps its own table of what the
workers hold (``scheduler_proc/lora_slots.py``) and refuses unknown names too.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from treadle.client.control import Control
from treadle.runtime.lora_args import LORA_NOT_ENABLED as NOT_ENABLED


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

    def __init__(self, enabled: bool, max_loaded: Optional[int] = None) -> None:
        self.enabled = enabled
        self.max_loaded = max_loaded
        self.paths: dict[str, str] = {}

    def load(self, control: Control, lora_name: Any, lora_path: Any, pinned: bool = False) -> LoRAUpdateOutput:
        """Load on every DP group (``control``: the engine's control calls); if one group fails,
        the groups that loaded it drop it again, so they agree."""
        why = self._why_not(lora_name, lora_path)
        if why is not None:
            return LoRAUpdateOutput(False, why)
        results = control.load_lora_adapter(lora_name, lora_path, bool(pinned))
        failed = [r for r in results.values() if not r.get("success")]
        if failed:
            ok = [g for g, r in results.items() if r.get("success")]
            if ok:
                control.unload_lora_adapter(lora_name, ok)
            return LoRAUpdateOutput(False, failed[0].get("error_message"), dict(self.paths))
        self.paths[lora_name] = lora_path
        return LoRAUpdateOutput(True, None, dict(self.paths))

    def unload(self, control: Control, lora_name: Any) -> LoRAUpdateOutput:
        if lora_name not in self.paths:
            return LoRAUpdateOutput(False, f"LoRA with name {lora_name} does not exist. Loaded LoRAs: "
                                           f"{sorted(self.paths)}", dict(self.paths))
        del self.paths[lora_name]
        control.unload_lora_adapter(lora_name)
        return LoRAUpdateOutput(True, None, dict(self.paths))

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
        if self.max_loaded is not None and len(self.paths) >= self.max_loaded:
            return (f"Cannot load LoRA adapter {lora_name}: max_loaded_loras={self.max_loaded} adapters are loaded. "
                    "Unload one first.")
        return None

    def resolve(self, lora_path: Any) -> Union[None, str, list[Optional[str]]]:
        """Check a call's ``lora_path`` (a name, a list of names / None per prompt, or None) and
        return it as the requests will carry it; raises ``ValueError``/``TypeError`` naming it."""
        if lora_path is None:
            return None
        names = lora_path if isinstance(lora_path, list) else [lora_path]
        for name in names:
            if name is not None and not isinstance(name, str):
                raise TypeError(f"lora_path must be an adapter name, a list of names (or None), got {name!r}.")
        wanted = [n for n in names if n is not None]
        if wanted and not self.enabled:
            raise ValueError(f"LoRA adapter '{wanted[0]}' was requested, but {NOT_ENABLED}")
        unknown = [n for n in wanted if n not in self.paths]
        if unknown:
            raise ValueError(f"Got LoRA adapter that has never been loaded: {unknown[0]}\n"
                             f"All loaded adapters: {sorted(self.paths)}.")
        return lora_path
