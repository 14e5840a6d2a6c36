"""LoRA arguments: their checks, the forms of ``lora_paths`` SGLang takes, and the device slots'
shape that the initial adapters imply (``ServerArgs.resolved()`` uses it when ``max_lora_rank`` /
``lora_target_modules`` are not given)."""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Union

from treadle.runtime.arg_checks import check_choice, check_int

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_NOT_ENABLED = "LoRA is not enabled. Please set `--enable-lora` to enable LoRA."
LORA_BACKENDS = ("csgmv", "triton", "torch_native")  # accepted for SGLang's sake; one implementation serves all
LORA_EVICTION_POLICIES = ("lru", "fifo")


def check_lora_args(a: Any) -> None:
    """A ``ValueError`` naming the field for a LoRA argument of ``a`` (a ``ServerArgs``) that is
    malformed, out of range, or names more initial adapters than may be loaded."""
    check_int("max_loras_per_batch", a.max_loras_per_batch, lo=1)
    if a.lora_paths is not None and not isinstance(a.lora_paths, (list, tuple, dict)):
        raise ValueError("lora_paths must be a list of paths or NAME=PATH strings.")
    initial = len(parse_lora_paths(a.lora_paths))
    check_choice("lora_backend", a.lora_backend, LORA_BACKENDS)
    check_choice("lora_eviction_policy", a.lora_eviction_policy, LORA_EVICTION_POLICIES)
    for name in ("max_loaded_loras", "max_lora_rank"):
        value = getattr(a, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}.")
    if a.max_loaded_loras is not None and initial > a.max_loaded_loras:  # as SGLang: none evicted at start
        raise ValueError(f"lora_paths names {initial} adapters, more than max_loaded_loras={a.max_loaded_loras}.")
    targets = a.lora_target_modules
    if targets is not None and (not isinstance(targets, (list, tuple))
                                or any(t not in LORA_TARGETS + ("all",) for t in targets)):
        raise ValueError(f"lora_target_modules must be a list of {', '.join(LORA_TARGETS)} (or 'all'), "
                         f"got {targets!r}.")


def device_slot_shape(lora_paths: Union[list, tuple, dict, None], max_lora_rank: Optional[int],
                      targets: Optional[list]) -> tuple[int, list]:
    """``(max_lora_rank, lora_target_modules)`` with the ones not given filled in: the rank of the
    largest initial adapter (else 64), and the projections the initial adapters target (else all)."""
    configs = [_adapter_config(path) for _, path, _ in parse_lora_paths(lora_paths)]
    if max_lora_rank is None:
        max_lora_rank = max([c["r"] for c in configs if isinstance(c.get("r"), int)] or [64])
    if targets is None:
        wanted = [c.get("target_modules") for c in configs]
        lists = all(isinstance(t, list) and set(t) <= set(LORA_TARGETS) for t in wanted)
        targets = [t for t in LORA_TARGETS if any(t in w for w in wanted)] if configs and lists else ["all"]
    return max_lora_rank, targets


def _adapter_config(path: str) -> dict:
    """A PEFT adapter directory's ``adapter_config.json`` ({} if unreadable: loading it reports why)."""
    try:
        with open(os.path.join(path, "adapter_config.json")) as f:
            cfg = json.load(f)
        return cfg if isinstance(cfg, dict) else {}
    except (OSError, ValueError):
        return {}


def parse_lora_paths(lora_paths: Union[list, tuple, dict, None]) -> list[tuple[str, str, bool]]:
    """``lora_paths`` as SGLang takes it, as ``(name, path, pinned)``: each item is ``PATH`` (the
    name is the path), ``NAME=PATH``, a dict ``{"lora_name", "lora_path", "pinned"}`` or its JSON
    string; a dict ``{name: path}`` is accepted as well."""
    if lora_paths is None:
        return []
    if isinstance(lora_paths, dict):
        return [(str(k), str(v), False) for k, v in lora_paths.items()]
    out = []
    for item in lora_paths:
        if isinstance(item, str) and item.lstrip().startswith("{"):
            item = json.loads(item)
        if isinstance(item, dict):
            if not isinstance(item.get("lora_name"), str) or not isinstance(item.get("lora_path"), str):
                raise ValueError(f"lora_paths entry {item!r} needs string lora_name and lora_path.")
            out.append((item["lora_name"], item["lora_path"], bool(item.get("pinned", False))))
        elif isinstance(item, str) and item:
            name, _, path = item.partition("=") if "=" in item else (item, "", item)
            out.append((name, path, False))
        else:
            raise ValueError(f"lora_paths entries must be PATH or NAME=PATH strings or dicts, got {item!r}.")
    names = [n for n, _, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"lora_paths names an adapter twice: {names}")
    return out
