"""Treadle: an LLM inference engine with SGLang's native Engine API.

    from treadle import Engine
    with Engine(model_path="default") as engine:
        print(engine.generate("The capital of France is", {"max_new_tokens": 8})["text"])
"""

from treadle.client.engine import Engine, FlushCacheReqOutput
from treadle.client.results import BatchResult
from treadle.runtime.errors import EngineDeadError, EngineOverloadedError
from treadle.runtime.sampling_params import SamplingParams
from treadle.runtime.server_args import ServerArgs

__all__ = [
    "Engine", "ServerArgs", "SamplingParams", "BatchResult", "FlushCacheReqOutput",
    "EngineDeadError", "EngineOverloadedError",
]
