"""Sentence-embedding pooling, as the checkpoint's sentence-transformers files declare it.

``modules.json`` lists the pipeline (Transformer, Pooling, maybe Normalize) and
``1_Pooling/config.json`` the mode. Without those files: CLS and normalized for encoders,
last token and normalized for decoders (SGLang's defaults for BERT and for e5-mistral style models).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch


@dataclass
class PoolingConfig:
    mode: str  # "cls" | "mean" | "max" | "last"
    normalize: bool


def load_pooling_config(model_dir: str, is_encoder: bool) -> PoolingConfig:
    modules_path = os.path.join(model_dir, "modules.json")
    if not os.path.exists(modules_path):
        return PoolingConfig("cls" if is_encoder else "last", True)
    with open(modules_path) as f:
        modules = json.load(f)
    mode, normalize = ("cls" if is_encoder else "last"), False
    for m in modules:
        kind = m.get("type", "")
        if kind.endswith("Normalize"):
            normalize = True
        elif kind.endswith("Pooling"):
            path = os.path.join(model_dir, m.get("path", ""), "config.json")
            if os.path.exists(path):
                with open(path) as f:
                    cfg = json.load(f)
                for key, name in (("pooling_mode_cls_token", "cls"), ("pooling_mode_mean_tokens", "mean"),
                                  ("pooling_mode_max_tokens", "max"), ("pooling_mode_lasttoken", "last")):
                    if cfg.get(key):
                        mode = name
                        break
    return PoolingConfig(mode, normalize)


def pool(hidden: torch.Tensor, cfg: PoolingConfig) -> torch.Tensor:
    """One vector (float32) from a sequence's hidden states ``[T, H]``."""
    h = hidden.float()
    v = {"cls": lambda: h[0], "last": lambda: h[-1], "mean": lambda: h.mean(0), "max": lambda: h.max(0).values}[cfg.mode]()
    return torch.nn.functional.normalize(v, dim=-1) if cfg.normalize else v
