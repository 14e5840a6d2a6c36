"""Linear layers an FP8 checkpoint keeps in float (``ignored_layers`` / ``ignore`` /
``modules_to_not_convert``), fused layers whose parts disagree included.

Rules name the checkpoint's modules (matched as transformers matches them: ``quant/not_converted.py``),
but Treadle fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``, so a rule can leave
only part of a fused layer unquantized: ``q_proj`` ignored while ``k_proj``/``v_proj`` are FP8, or
``up_proj`` ignored beside an FP8 ``gate_proj``. transformers never fuses them, so each part keeps
its own format there; SGLang and vLLM refuse such a checkpoint ("some but not all shards ... are
quantized"). Here the fused layer runs in the model's dtype and its FP8 parts are dequantized with
their own scales as they load (``MixedParts``): the numbers transformers gives on the dequantized
weights, at the price of that layer's FP8 bytes and kernels (one info line per layer says so).
"""

from __future__ import annotations

import logging
import math
from functools import partial
from typing import Any, Optional

import torch
from torch import nn

from treadle.gpu_worker.fp8 import checkpoint_dtype, checkpoint_rows, load_scale, param_with_loader
from treadle.gpu_worker.layers.fp8_linear import FP8, Fp8Linear, dequantize
from treadle.gpu_worker.layers.linear import LinearBase
from treadle.gpu_worker.quant.not_converted import fused_parts, not_converted, part_names
from treadle.runtime.fp8_config import Fp8Scheme

logger = logging.getLogger("treadle.worker")


def part_rows(layer: LinearBase, shard_id: Any) -> slice:
    """This rank's rows of a fused layer's part ``shard_id`` (None: a whole fused checkpoint tensor),
    found by loading a marker through the layer's own loader (its tensor-parallel arithmetic)."""
    marker = torch.zeros(layer.weight.shape[0])
    type(layer).weight_loader(layer, marker, torch.ones(checkpoint_rows(layer, shard_id)), shard_id)
    idx = marker.nonzero()[:, 0]
    return slice(int(idx[0]), int(idx[-1]) + 1)


class MixedParts:
    """The loaders of a fused layer kept in float whose parts may come as e4m3 weights with scales.

    A float part loads as it is. An FP8 part's weight and its ``weight_scale`` may arrive in either
    order (or files): each waits here, in this rank's rows of the FP8 layer's layout, until the
    other comes; then the part's rows of the float weight become their product, computed in
    float32 as ``fp8.finish`` dequantizes an FP8 layer. A part still waiting when a load ends is an
    error (``check_paired``). The same holds for weight updates, which may send FP8 parts too."""

    def __init__(self, layer: LinearBase, scheme: Fp8Scheme, name: str):
        self.layer, self.scheme, self.name = layer, scheme, name
        self.codes: Optional[torch.Tensor] = None  # [N, K] e4m3: rows of parts waiting for their scale
        self.scales: Optional[torch.Tensor] = None  # [N] or [N, KB] float32 (fp8.load_scale's layout)
        self.waiting: dict[str, set] = {"weight": set(), "weight_scale": set()}

    def load_weight(self, param: nn.Parameter, full: Any, shard_id: Any = None) -> None:
        own = type(self.layer).weight_loader.__get__(self.layer)
        if checkpoint_dtype(full) != FP8:
            own(param, full, shard_id)
            self.waiting["weight"].discard(shard_id)  # a float tensor replaces FP8 rows still waiting
            return
        if self.codes is None:
            self.codes = torch.empty(param.shape, dtype=FP8, device=param.device)
        own(self.codes, full, shard_id)
        self._arrived("weight", shard_id)

    def load_scale(self, param: nn.Parameter, full: Any, shard_id: Any = None) -> None:
        if self.scales is None:
            n, k = self.layer.weight.shape
            shape = (n,) if self.scheme.block is None else (n, math.ceil(k / self.scheme.block[1]))
            self.scales = torch.ones(shape, dtype=torch.float32, device=self.layer.weight.device)
        load_scale(self.layer, self.scheme, self.scales, full, shard_id)
        self._arrived("weight_scale", shard_id)

    def _arrived(self, kind: str, shard_id: Any) -> None:
        self.waiting[kind].add(shard_id)
        if any(shard_id not in w for w in self.waiting.values()):
            return
        for w in self.waiting.values():
            w.discard(shard_id)
        weight = self.layer.weight
        if not weight.is_meta:  # (a meta copy only checks names and shapes: model_loader.load_checked)
            rows = part_rows(self.layer, shard_id)
            group = weight.shape[1] if self.scheme.block is None else self.scheme.block[1]
            weight.data[rows] = dequantize(self.codes[rows], self.scales[rows], group).to(weight.dtype)
        if not any(self.waiting.values()):
            self.codes = self.scales = None

    def unpaired(self) -> list[str]:
        """What still waits for its partner, in words."""
        return ([f"{self.name} part {s!r}: an FP8 weight without its weight_scale" for s in self.waiting["weight"]]
                + [f"{self.name} part {s!r}: a weight_scale without its FP8 weight"
                   for s in self.waiting["weight_scale"]])


def float_only(name: str, own: Any, param: nn.Parameter, full: Any, shard_id: Any = None) -> None:
    """The loader of a layer the checkpoint leaves float: an FP8 tensor there (an update, or a
    checkpoint that breaks its own rules) is refused, not copied without its scales."""
    if checkpoint_dtype(full) == FP8:
        raise ValueError(f"an FP8 tensor for {name}, which the checkpoint's quantization_config leaves unquantized "
                         "(ignored_layers/ignore/modules_to_not_convert): its float weight is expected")
    own(param, full, shard_id)


def restore_ignored(model: nn.Module, scheme: Optional[Fp8Scheme]) -> None:
    """Layers the checkpoint keeps in float get a float weight back (built FP8 by ``fp8.building``).
    A fused layer goes by its checkpoint parts' names (``qkv_proj`` by ``q_proj``, ...): all of
    them named (or the fused name itself), it is a plain float layer; only some, it is float with
    ``MixedParts`` loaders and a ``weight_scale`` parameter of no elements, the place its FP8 parts'
    scales load through."""
    if scheme is None or not scheme.ignored:
        return
    fused = fused_parts(model)
    for name, layer in model.named_modules():
        if not isinstance(layer.__dict__.get("quant"), Fp8Linear):
            continue
        parts = part_names(fused, name)
        kept = [p for p in parts if not_converted(p, scheme.ignored)]
        whole = not_converted(name, scheme.ignored) or len(kept) == len(parts)
        if not (kept or whole):
            continue
        dtype, device = layer.quant.dtype, layer.weight.device
        del layer.weight_scale, layer.quant
        weight = torch.empty(layer.weight.shape, dtype=dtype, device=device)
        if whole:
            layer.weight = param_with_loader(weight, partial(float_only, name, layer.weight_loader))
            continue
        mixed = layer.fp8_parts = MixedParts(layer, scheme, name)
        layer.weight = param_with_loader(weight, mixed.load_weight)
        layer.weight_scale = param_with_loader(torch.empty(0, device=device), mixed.load_scale)
        if device.type != "meta":  # (not for load_checked's meta copy at each update)
            floats, fp8s = (", ".join(p.rpartition(".")[2] for p in parts if (p in kept) == k) for k in (True, False))
            logger.info("FP8 checkpoint: %s runs in %s: the checkpoint leaves %s unquantized and stores %s in "
                        "FP8, dequantized with their scales as they load", name, str(dtype).removeprefix("torch."),
                        floats, fp8s)


def mixed_layers(model: nn.Module) -> list[LinearBase]:
    return [m for m in model.modules() if "fp8_parts" in m.__dict__]


def check_paired(model: nn.Module) -> None:
    """After a load: every FP8 part of a mixed layer came with its scale (a ValueError otherwise)."""
    problems = [p for m in mixed_layers(model) for p in m.fp8_parts.unpaired()]
    if problems:
        raise ValueError(f"FP8 tensors without their partner: {'; '.join(problems[:4])}"
                         f"{f' (and {len(problems) - 4} more)' if len(problems) > 4 else ''}")
