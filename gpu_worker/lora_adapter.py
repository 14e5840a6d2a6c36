"""PEFT LoRA adapters in host memory: reading and checking an adapter directory, loading it on
every worker rank or on none, and putting the adapters a plan names into device slots
(``lora.LoRAPool``, which applies them).

Adapters wait in host memory (float32, whole, on every rank) until a request needs one; the
scheduler then names a device slot for it in the plan's ``lora_loads``.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from treadle.gpu_worker.distributed import first_failed_rank
from treadle.runtime.messages import LoraLoad
from treadle.runtime.lora_args import LORA_NOT_ENABLED, LORA_TARGETS as TARGETS

if TYPE_CHECKING:
    from treadle.gpu_worker.lora import LoRAPool

# Config fields whose non-empty value changes the math or adds weights that LoRAPool does not apply.
_UNSUPPORTED = {"use_dora": "DoRA (use_dora)", "rank_pattern": "per-module ranks (rank_pattern)",
                "alpha_pattern": "per-module alphas (alpha_pattern)", "modules_to_save": "modules_to_save",
                "lora_bias": "LoRA bias (lora_bias)", "layer_replication": "layer_replication",
                "trainable_token_indices": "trainable_token_indices", "target_parameters": "target_parameters",
                "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)"}
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:[\w.]+\.)?(\w+)\.lora_([AB])\.weight$")


@dataclass
class LoRAAdapter:
    """One PEFT adapter on the CPU in float32: ``weights[(layer, hf_module)] = (A [r, in], B [out, r])``."""

    rank: int
    scaling: float
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    path: str = ""


def _fail(path: str, why: str) -> None:
    raise ValueError(f"LoRA adapter {path}: {why}")


def _read_config(path: str) -> dict:
    cfg_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(cfg_path):
        _fail(path, "adapter_config.json not found")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if cfg.get("peft_type", "LORA") != "LORA":
        _fail(path, f"peft_type {cfg['peft_type']!r} is not LORA")
    for key, what in _UNSUPPORTED.items():
        if cfg.get(key):
            _fail(path, f"{what} is not supported")
    if cfg.get("bias", "none") != "none":
        _fail(path, f"bias={cfg['bias']!r} is not supported (only 'none')")
    targets = cfg.get("target_modules")
    if isinstance(targets, (list, tuple)):  # a string is a regex (or "all-linear"): the tensor names decide
        bad = sorted(set(targets) - set(TARGETS))
        if bad:
            _fail(path, f"target modules {bad} are not supported (only {', '.join(TARGETS)})")
    if not isinstance(cfg.get("r"), int) or cfg["r"] <= 0:
        _fail(path, f"bad rank r={cfg.get('r')!r}")
    return cfg


def _read_tensors(path: str) -> dict[str, torch.Tensor]:
    st, bin_ = os.path.join(path, "adapter_model.safetensors"), os.path.join(path, "adapter_model.bin")
    if os.path.isfile(st):
        from safetensors.torch import load_file

        return load_file(st, device="cpu")
    if os.path.isfile(bin_):
        return torch.load(bin_, map_location="cpu", weights_only=True)
    _fail(path, "neither adapter_model.safetensors nor adapter_model.bin found")


def read_adapter(path: str) -> LoRAAdapter:
    """Read a PEFT LoRA adapter directory; rejects (ValueError) whatever ``LoRAPool`` would not
    apply exactly, so an adapter either serves PEFT's outputs or does not load at all."""
    cfg = _read_config(path)
    r = cfg["r"]
    scaling = cfg.get("lora_alpha", r) / (math.sqrt(r) if cfg.get("use_rslora") else r)
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in _read_tensors(path).items():
        m = _KEY.search(key)
        if m is None:
            _fail(path, f"tensor {key!r} is not a LoRA A/B of a decoder layer projection "
                        f"(supported: {', '.join(TARGETS)})")
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        if module not in TARGETS:
            _fail(path, f"target module {module!r} ({key}) is not supported (only {', '.join(TARGETS)})")
        if t.dim() != 2 or t.shape[0 if ab == "A" else 1] != r:
            _fail(path, f"{key} has shape {tuple(t.shape)}, expected rank {r}")
        halves.setdefault((layer, module), {})[ab] = t.float()
    if not halves:
        _fail(path, "no LoRA tensors found")
    weights = {}
    for (layer, module), ab in sorted(halves.items()):
        if set(ab) != {"A", "B"}:
            _fail(path, f"layer {layer} {module} lacks lora_{'B' if 'A' in ab else 'A'}")
        weights[(layer, module)] = (ab["A"], ab["B"])
    return LoRAAdapter(rank=r, scaling=float(scaling), weights=weights, path=path)


def read_on_all_ranks(name: str, path: str, pool: Optional["LoRAPool"], device: torch.device) -> LoRAAdapter:
    """Read a PEFT adapter into host memory, checked against this model (rank, module shapes);
    a plan's ``lora_loads`` puts it into a device slot when a request needs it."""
    error, adapter = "", None
    try:
        if pool is None:
            raise ValueError(LORA_NOT_ENABLED)
        adapter = read_adapter(path)
        pool.check(adapter)
    except ValueError as e:
        error = str(e)
    # Every rank must hold the adapter, or none: a rank that failed (another machine's copy of
    # the path, say) fails the load everywhere, so the ranks never disagree about it later.
    failed = first_failed_rank(bool(error), device)
    if failed is not None:
        if not error:
            error = f"loading LoRA adapter {name!r} failed on worker rank {failed} (its log says why)"
        raise ValueError(error)
    return adapter


def load_planned(pool: Optional["LoRAPool"], adapters: dict[str, LoRAAdapter], loads: Sequence[LoraLoad]) -> None:
    """A plan's ``lora_loads``: each named (loaded) adapter into its device slot."""
    for load in loads:
        if pool is None or load.name not in adapters:
            raise ValueError(f"LoRA adapter {load.name!r} is not loaded on this worker")
        pool.load(load.slot, adapters[load.name])
