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


def fused_parts(model: nn.Module) -> dict[str, list[str]]:
    """Each fused layer name of ``model`` (``qkv_proj``) -> its checkpoint parts (``q_proj``, ...),
    from the ``stacked_params`` of the model and of any model inside it (LLaVA's language model)."""
    parts: dict[str, list[str]] = {}
    for m in model.modules():
        for fused, hf, _ in getattr(m, "stacked_params", ()):
            if hf not in parts.setdefault(fused, []):
                parts[fused].append(hf)
    return parts


def part_names(fused: dict[str, list[str]], name: str) -> list[str]:
    """The checkpoint names of the module ``name``: a fused layer's parts' (``fused_parts``), or its own."""
    prefix, _, last = name.rpartition(".")
    return [f"{prefix}.{hf}" if prefix else hf for hf in fused[last]] if last in fused else [name]
