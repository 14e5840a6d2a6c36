"""HF ``architectures`` names -> model classes (imported lazily, one module per family)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from treadle.runtime.model_check import ARCHITECTURES, architecture

if TYPE_CHECKING:
    from treadle.gpu_worker.models.base import ModelBase


def get_model_class(config) -> type[ModelBase]:
    """The class of the config's architecture (the names live in runtime/model_check.py, which
    refuses an unbuilt one before any process starts)."""
    arch = architecture({"architectures": getattr(config, "architectures", None),
                         "model_type": getattr(config, "model_type", None)})
    if arch is None:
        raise ValueError(f"unsupported architectures {getattr(config, 'architectures', None)}; "
                         f"supported: {sorted(ARCHITECTURES)}")
    return getattr(importlib.import_module(f"treadle.gpu_worker.models.{ARCHITECTURES[arch]}"), arch)
