"""Sentence-embedding pooling, as the checkpoint's sentence-transformers files declare it.

``modules.json`` lists the pipeline (Transformer, Pooling, maybe Normalize) and
``1_Pooling/config.json`` the mode. Without those files: CLS and normalized for encoders,
last token and normalized for decoders (SGLang's defaults for BERT and for e5-mistral style models).
``encode_plan`` runs an encoder model's step: each row a whole sequence, pooled.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from treadle.gpu_worker.step_inputs import check_slot
from treadle.runtime.messages import ForwardPlan, RowOut

if TYPE_CHECKING:
    from treadle.gpu_worker.models.base import Model


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


def encode_plan(model: "Model", plan: ForwardPlan, cfg: PoolingConfig, max_slots: int, vocab_size: int,
                tp_rank: int) -> dict[int, RowOut]:
    """Encoder models: every row is a whole sequence; return its pooled embedding (float32 bytes)."""
    for ns in plan.new_slots:
        check_slot(ns.slot, max_slots)
    for row in plan.rows:
        if (row.start_pos != 0 or not row.input_ids or max(row.input_ids) >= vocab_size
                or min(row.input_ids) < 0 or row.mm):
            raise ValueError(f"encoder row of slot {row.slot} must be a whole in-vocabulary sequence")
    if not plan.rows or tp_rank != 0:
        return {}
    hidden = model.encode([row.input_ids for row in plan.rows])
    return {r: RowOut(hidden=pool(h, cfg).cpu().numpy().tobytes()) for r, h in enumerate(hidden)}
