"""Which linear layers a quantized checkpoint keeps dense: ``modules_to_not_convert`` (AutoAWQ,
GPTQ, fbgemm FP8) and ``ignored_layers`` / ``ignore`` (the FP8 formats), matched as transformers
matches them, so a checkpoint loads here with the layers it was saved with.

A pattern names a module from the start up to a module boundary (also as a regex:
``model.layers.1`` is ``model.layers.1.self_attn.q_proj`` but not ``model.layers.11...``), or is
a suffix of its name (``mlp.gate``, ``lm_head``); ``re:<regex>`` (compressed-tensors) is matched
from the start. Patterns name the checkpoint's modules; a fused layer here (``qkv_proj``) goes by
each of its parts' names (``q_proj``, ``k_proj``, ``v_proj``: the model's ``stacked_params``).
"""

from __future__ import annotations

import re
from typing import Iterable

from torch import nn

_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"


def not_converted(name: str, patterns: Iterable[str]) -> bool:
    """Whether a module of this (checkpoint) name is one of ``patterns``."""
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], name):
                return True
        elif name.endswith(p) or re.match(rf"(?:{p}){_BOUNDARY}", name):
            return True
    return False


def part_names(model: nn.Module, name: str) -> list[str]:
    """The checkpoint names of the module ``name`` of ``model``: its own, or a fused layer's parts'."""
    stacked = {(fused, hf) for m in model.modules() for fused, hf, _ in getattr(m, "stacked_params", ())}
    parts = [name[:-len(fused)] + hf for fused, hf in sorted(stacked) if name.endswith("." + fused)]
    return parts or [name]
