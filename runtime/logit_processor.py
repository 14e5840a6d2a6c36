"""Custom logit processors: user code run in the worker on the logits of the requests that ask.

A processor is referenced by import path (``"package.module:Name"``), by a name registered on
the engine, or given as a ``CustomLogitProcessor`` subclass or instance (sent as its import
path, an instance's attributes as JSON). Nothing is pickled: the worker imports the class.
Off unless the engine is started with ``enable_custom_logit_processor=True``.
"""

from __future__ import annotations

import importlib
from typing import Any, Optional

import msgspec


class CustomLogitProcessor:
    """Subclass and implement ``__call__``.

    ``logits`` is the float32 ``[rows, vocab]`` tensor of the requests in this batch that use
    this processor; ``custom_param_list`` has one dict per row: the request's
    ``sampling_params["custom_params"]`` plus ``"__output_ids__"`` (its tokens so far).
    Return logits of the same shape (in place is fine).
    """

    def __call__(self, logits: Any, custom_param_list: list[dict[str, Any]]) -> Any:
        raise NotImplementedError

    @classmethod
    def to_str(cls) -> str:
        """SGLang's spelling: the string to pass as ``custom_logit_processor`` (here an import path)."""
        return processor_reference(cls, {})[0]


class DisallowedTokensLogitsProcessor(CustomLogitProcessor):
    """Bans ``custom_params["token_ids"]`` (SGLang's built-in of the same name)."""

    def __call__(self, logits: Any, custom_param_list: list[dict[str, Any]]) -> Any:
        for i, params in enumerate(custom_param_list):
            ids = (params or {}).get("token_ids") or []
            if ids:
                logits[i, ids] = float("-inf")
        return logits


BUILTINS = {"DisallowedTokensLogitsProcessor": f"{__name__}:DisallowedTokensLogitsProcessor"}


def processor_reference(proc: Any, registry: dict[str, str]) -> tuple[str, Optional[dict[str, Any]]]:
    """``(import path, instance state or None)`` for what a user passed as ``custom_logit_processor``."""
    if isinstance(proc, str):
        if proc in registry:
            return registry[proc], None
        if proc in BUILTINS:
            return BUILTINS[proc], None
        if ":" in proc:
            return proc, None
        raise ValueError(
            f"custom_logit_processor={proc!r} is neither a registered name ({sorted({**BUILTINS, **registry})}) "
            f"nor an import path 'package.module:Name'."
        )
    cls = proc if isinstance(proc, type) else type(proc)
    if not issubclass(cls, CustomLogitProcessor):
        raise TypeError("custom_logit_processor must subclass treadle.CustomLogitProcessor.")
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        raise TypeError(
            f"custom_logit_processor {cls.__qualname__} is defined in __main__ or inside a function, so the "
            f"worker process cannot import it: define it in an importable module."
        )
    state = None
    if not isinstance(proc, type) and vars(proc):
        try:
            state = msgspec.json.decode(msgspec.json.encode(vars(proc)))
        except (TypeError, msgspec.EncodeError):
            raise TypeError(f"the attributes of {cls.__qualname__} must be JSON-serializable to reach the worker.") from None
    return f"{cls.__module__}:{cls.__qualname__}", state


def load_processor(path: str, state: Optional[dict[str, Any]]) -> CustomLogitProcessor:
    """Import and instantiate a processor in the worker (a subclass check guards the import)."""
    module, _, name = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, CustomLogitProcessor)):
        raise TypeError(f"{path} is not a CustomLogitProcessor subclass")
    if state is None:
        return obj()
    inst = obj.__new__(obj)
    inst.__dict__.update(state)
    return inst
