"""``encode(..., dimensions=N)``: Matryoshka truncation, checked as SGLang checks it.

A model declares that its embeddings may be cut short with ``is_matryoshka: true`` or a list of
``matryoshka_dimensions`` in its config.json (SGLang reads the same keys; add them with the
checkpoint's config for models like Qwen3-Embedding whose configs do not say so). The scheduler
keeps the first N values of the pooled vector and normalizes after the cut, as SGLang's pooler does.
"""

from __future__ import annotations

from typing import Any, Optional


def check_dimensions(dimensions: Any, cfg: dict[str, Any], model: str) -> Optional[int]:
    """``dimensions`` as an int (None: the full vector); ValueError naming what is wrong."""
    if dimensions is None:
        return None
    if isinstance(dimensions, bool) or not isinstance(dimensions, int):
        raise TypeError(f"dimensions must be an int, got {type(dimensions).__name__}")
    allowed = cfg.get("matryoshka_dimensions")
    if not (allowed or cfg.get("is_matryoshka")):
        raise ValueError(f"Model '{model}' does not support matryoshka representation, changing output dimensions "
                         "will lead to poor results.")
    if dimensions < 1:
        raise ValueError("Requested dimensions must be greater than 0")
    if allowed and dimensions not in allowed:
        raise ValueError(f"Model '{model}' only supports {allowed} matryoshka dimensions, using other output "
                         "dimensions will lead to poor results.")
    hidden = cfg.get("hidden_size")
    if hidden and dimensions > hidden:
        raise ValueError(f"Provided dimensions are greater than max embedding dimension: {hidden}")
    return dimensions
