"""The tensor names of a safetensors checkpoint, read from its index or file headers (no tensor
data, no torch): enough to tell before any process starts that a decoder checkpoint has no LM
head (Qwen3-Embedding-8B ships an untied ``Qwen3Model``), so it can only serve embeddings."""

from __future__ import annotations

import glob
import json
import os
import struct
from typing import Any, Optional


def tensor_names(model_dir: str) -> Optional[set[str]]:
    """Every tensor name of the directory's ``*.safetensors`` (None: none there, or a header that
    cannot be read: the loader reports a broken file with its own error)."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return set(json.load(f).get("weight_map", {}))
    names: set[str] = set()
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    for path in files:
        with open(path, "rb") as f:
            try:
                (size,) = struct.unpack("<Q", f.read(8))
                names |= set(json.loads(f.read(size))) - {"__metadata__"}
            except (struct.error, ValueError):
                return None
    return names if files else None


def headless_error(model_dir: str, cfg: dict[str, Any], is_embedding: bool) -> str:
    """Why a decoder checkpoint cannot generate ("" if it can, or serves embeddings anyway)."""
    if is_embedding or cfg.get("tie_word_embeddings"):
        return ""
    names = tensor_names(model_dir)
    if not names or any("lm_head" in n for n in names):
        return ""
    return (f"the checkpoint in {model_dir} has no LM head (no lm_head.weight, and tie_word_embeddings is off): it is "
            "an embedding model; start the engine with is_embedding=True and use encode()")
