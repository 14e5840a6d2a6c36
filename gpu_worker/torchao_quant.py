"""SGLang's ``torchao_config``: the torchao library quantizes the model's linear layers after load.

``torchao.quantization.quantize_`` swaps each layer's weight for a torchao tensor subclass
(int8/int4/fp8 data plus scales); ``F.linear`` on it dispatches to torchao's kernels, so the
layers keep their plain ``project`` path (``layers/linear.py``). Only this rank's shard is
quantized, after tensor-parallel loading. The layers leave the Triton GEMV (it reads a plain
dense weight). LoRA deltas are added to the layer's output as before and stay in the model dtype.
Which recipes a device can run is checked before start-up (``runtime/torchao_args.py``).
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from treadle.gpu_worker.layers.linear import LinearBase
from treadle.runtime.torchao_args import parse_torchao_config

logger = logging.getLogger("treadle.worker")


def torchao_recipe(value: str):
    """The torchao ``quantize_`` config object of a ``torchao_config`` string."""
    kind, group = parse_torchao_config(value)
    with warnings.catch_warnings():  # torchao warns about optional CUDA extensions a CPU build lacks
        warnings.simplefilter("ignore")
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig, Int4WeightOnlyConfig,
            Int8WeightOnlyConfig, PerRow, PerTensor,
        )
    if kind == "int8wo":
        return Int8WeightOnlyConfig()
    if kind == "int4wo":  # tinygemm's layout: bf16 on CUDA, no extra kernel package needed
        return Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d")
    if kind == "fp8wo":
        return Float8WeightOnlyConfig()
    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow() if kind.endswith("per_row") else PerTensor())


def apply_torchao(model: nn.Module, value: str) -> int:
    """Quantize every linear layer of ``model`` with the ``torchao_config`` recipe (``""``: none);
    returns how many layers it quantized."""
    if not value:
        return 0
    from torchao.quantization import quantize_

    layers = [m for m in model.modules() if isinstance(m, LinearBase) and "quant" not in m.__dict__]
    targets = set(map(id, layers))
    quantize_(model, torchao_recipe(value), filter_fn=lambda m, fqn: id(m) in targets)
    for m in layers:
        m.gemv_config = None
    logger.info("torchao_config=%s: %d linear layers quantized", value, len(layers))
    return len(layers)


def tensor_bytes(t: torch.Tensor) -> int:
    """The bytes ``t`` holds: a torchao tensor subclass's inner tensors (int8/int4/fp8 data and
    scales), not its logical dtype's size."""
    if hasattr(type(t), "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()
