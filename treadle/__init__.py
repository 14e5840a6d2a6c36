"""Treadle: an LLM inference engine with SGLang's native Engine API.

    from treadle import Engine
    with Engine(model_path="default") as engine:
        print(engine.generate("The capital of France is", {"max_new_tokens": 8})["text"])
"""

import os as _os

# Running from a source checkout without installing (the lent GPU machine, a quick try): the
# subpackages are the repository's top-level folders, beside this one.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "runtime", "messages.py")) and _root not in __path__:
    __path__.append(_root)

from treadle.client.engine import Engine, FlushCacheReqOutput  # noqa: E402
from treadle.client.results import BatchResult  # noqa: E402
from treadle.runtime.errors import EngineDeadError, EngineOverloadedError  # noqa: E402
from treadle.runtime.logit_processor import CustomLogitProcessor, DisallowedTokensLogitsProcessor  # noqa: E402
from treadle.runtime.sampling_params import SamplingParams  # noqa: E402
from treadle.runtime.server_args import ServerArgs  # noqa: E402

__all__ = [
    "Engine", "ServerArgs", "SamplingParams", "BatchResult", "FlushCacheReqOutput",
    "EngineDeadError", "EngineOverloadedError", "CustomLogitProcessor", "DisallowedTokensLogitsProcessor",
]


def __getattr__(name: str):
    """``treadle.RemoteEngine`` needs httpx (the ``serve`` extra): imported on first use only."""
    if name == "RemoteEngine":
        from treadle.client.remote import RemoteEngine

        return RemoteEngine
    raise AttributeError(f"module 'treadle' has no attribute {name!r}")
