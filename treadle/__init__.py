"""Treadle: an LLM inference engine with SGLang's native Engine API.

    from treadle import Engine
    with Engine(model_path="default") as engine:
        print(engine.generate("The capital of France is", {"max_new_tokens": 8})["text"])
"""

import importlib as _importlib
import os as _os
from typing import TYPE_CHECKING

# Running from a source checkout without installing (the lent GPU machine, a quick try): the
# subpackages are the repository's top-level folders, beside this one.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "runtime", "messages.py")) and _root not in __path__:
    __path__.append(_root)

# The public names, imported on first use (PEP 562): every engine child process starts as
# ``python -m treadle.<part>``, which runs this file first, and importing the client here would
# cost each of them 0.4 s of start-up for code it never runs. ``RemoteEngine`` also needs httpx
# (the ``serve`` extra).
_EXPORTS = {
    "Engine": "treadle.client.engine", "FlushCacheReqOutput": "treadle.client.engine",
    "BatchResult": "treadle.client.results", "ServerArgs": "treadle.runtime.server_args",
    "SamplingParams": "treadle.runtime.sampling_params",
    "EngineDeadError": "treadle.runtime.errors", "EngineOverloadedError": "treadle.runtime.errors",
    "CustomLogitProcessor": "treadle.runtime.logit_processor",
    "DisallowedTokensLogitsProcessor": "treadle.runtime.logit_processor",
    "RemoteEngine": "treadle.client.remote",
}
__all__ = [n for n in _EXPORTS if n != "RemoteEngine"]

if TYPE_CHECKING:  # for type checkers and IDEs
    from treadle.client.engine import Engine, FlushCacheReqOutput  # noqa: F401
    from treadle.client.remote import RemoteEngine  # noqa: F401
    from treadle.client.results import BatchResult  # noqa: F401
    from treadle.runtime.errors import EngineDeadError, EngineOverloadedError  # noqa: F401
    from treadle.runtime.logit_processor import CustomLogitProcessor, DisallowedTokensLogitsProcessor  # noqa: F401
    from treadle.runtime.sampling_params import SamplingParams  # noqa: F401
    from treadle.runtime.server_args import ServerArgs  # noqa: F401


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'treadle' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
