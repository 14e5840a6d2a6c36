"""HF ``architectures`` names -> model classes (imported lazily, one module per family)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from treadle.gpu_worker.models.base import ModelBase

_MODELS = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "BertModel": "bert",
    "LlavaForConditionalGeneration": "llava",
}


# For configs without ``architectures`` (e.g. written by a converter).
_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "bert": "BertModel", "llava": "LlavaForConditionalGeneration"}


def get_model_class(config) -> type[ModelBase]:
    archs = list(getattr(config, "architectures", None) or [])
    archs += [_BY_MODEL_TYPE[t] for t in [getattr(config, "model_type", None)] if t in _BY_MODEL_TYPE]
    for arch in archs:
        if arch in _MODELS:
            module = importlib.import_module(f"treadle.gpu_worker.models.{_MODELS[arch]}")
            return getattr(module, arch)
    raise ValueError(f"unsupported architectures {archs}; supported: {sorted(_MODELS)}")
