"""FP8 weights at load: which linear layers hold them, how checkpoint scales reach each rank, and
what the CPU does with them.

While the model is built (``building``) every linear layer gets an e4m3 ``weight`` and a float32
``weight_scale`` parameter in place of its float weight (one layer's float weight exists at a
time), and an ``Fp8Linear`` that does its product. Both parameters load through the layer's own
tensor-parallel loader, so scales are sliced with the weight's rows (``layers/fp8_linear.py``
keeps every scale form per row for this):

- an FP8 checkpoint (``runtime/fp8_config.py``): ``weight`` is copied as stored, ``weight_scale``
  (or DeepSeek's ``weight_scale_inv``) repeated over rows, ``input_scale`` read past;
- ``quantization="fp8"`` on a float checkpoint: each weight is moved to the device as it is read
  and quantized there per output row (``dynamic``), so no float copy of the model ever exists.

On the CPU the model then runs on the dequantized weights in its own dtype (``finish``): an FP8
checkpoint gives the numbers transformers' dequantized reference gives, and ``quantization="fp8"``
on a float checkpoint gives the FP8-rounded weights a GPU would serve (a round trip, no speed-up).
Layers the checkpoint leaves float, fused layers whose parts disagree included: ``fp8_ignored.py``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import partial
from typing import Any, Iterator, Optional

import torch
from torch import nn

from treadle.gpu_worker.distributed import tp_size
from treadle.gpu_worker.layers import linear
from treadle.gpu_worker.layers.fp8_linear import FP8, Fp8Linear, dequantize, quantize_groups, quantize_rows
from treadle.gpu_worker.layers.linear import (
    ColumnParallelLinear, LinearBase, MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear,
)
from treadle.runtime.fp8_config import Fp8Scheme, fp8_params

SCALE_NAMES = {"weight_scale_inv": "weight_scale"}  # checkpoint name -> parameter name
SKIPPED = ("input_scale",)  # static activation scales: activations are quantized per token instead


def fp8_scheme(config: Any, quantization: Optional[str]) -> Optional[Fp8Scheme]:
    """The model's FP8 scheme: its checkpoint's (``quantization_config``), or per-row quantization
    at load for ``quantization="fp8"`` on a float checkpoint; None: no FP8 weights."""
    q = getattr(config, "quantization_config", None)
    if q is None and getattr(config, "text_config", None) is not None:
        q = getattr(config.text_config, "quantization_config", None)
    scheme = fp8_params(q)
    if scheme is None and quantization == "fp8":
        scheme = Fp8Scheme(dynamic=True)
    return scheme


def checkpoint_rows(layer: LinearBase, shard_id: Any) -> int:
    """Rows of the checkpoint tensor that ``layer.weight_loader(param, full, shard_id)`` takes."""
    if isinstance(layer, QKVParallelLinear):
        return sum(layer.full_sizes) if shard_id is None else layer.full_sizes["qkv".index(shard_id)]
    if isinstance(layer, MergedColumnParallelLinear):
        return sum(layer.out_sizes) if shard_id is None else layer.out_sizes[shard_id]
    if isinstance(layer, ColumnParallelLinear):
        return layer.out_size * tp_size()
    return layer.out_size


def _read(full: Any) -> torch.Tensor:
    return full if isinstance(full, torch.Tensor) else full[...]  # a loader.CheckpointTensor read whole (0-d too)


def checkpoint_dtype(full: Any) -> torch.dtype:
    return full.dtype if isinstance(full, torch.Tensor) else full.narrow(0, 0, 1).dtype


def param_with_loader(t: torch.Tensor, loader: Any) -> nn.Parameter:
    p = nn.Parameter(t, requires_grad=False)
    p.weight_loader = loader
    return p


def quantize_float(w: torch.Tensor, group: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A float ``[N, K]`` weight in an FP8 layer's scale layout: per row (``group`` None:
    ``quantization="fp8"``, per-tensor and per-channel checkpoints), or per row and ``group``
    columns (block checkpoints)."""
    return quantize_rows(w) if group is None else quantize_groups(w, group)


def load_scale(layer: LinearBase, scheme: Fp8Scheme, param: torch.Tensor, full: Any, shard_id: Any = None) -> None:
    """A checkpoint scale (``weight_scale``/``weight_scale_inv``: per tensor, per channel or per block)
    into ``param``, this rank's rows of ``layer``'s per-row layout (``[N]``, or ``[N, KB]`` for blocks)."""
    own, s, rows = type(layer).weight_loader.__get__(layer), _read(full).float(), checkpoint_rows(layer, shard_id)
    if scheme.block is None:
        s = s.reshape(-1)
        if s.numel() not in (1, rows):
            raise ValueError(f"FP8 weight_scale of {s.numel()} values for a {rows}-row checkpoint tensor")
        own(param, s.expand(rows).contiguous(), shard_id)
        return
    if s.dim() != 2 or s.shape[0] != math.ceil(rows / scheme.block[0]):
        raise ValueError(f"FP8 block scales {tuple(s.shape)} do not fit {rows} rows in blocks of {scheme.block}")
    s = s.repeat_interleave(scheme.block[0], dim=0)[:rows]
    if isinstance(layer, RowParallelLinear):  # columns split: this rank's blocks
        param.data.copy_(s.narrow(1, layer.in_start // scheme.block[1], param.shape[1]))
    else:
        own(param, s, shard_id)


def convert(layer: LinearBase, scheme: Fp8Scheme) -> None:
    """Give ``layer`` an FP8 weight, its scales and the ``Fp8Linear`` that uses them."""
    n, k = layer.weight.shape
    device, own = layer.weight.device, type(layer).weight_loader.__get__(layer)
    group = k if scheme.block is None else scheme.block[1]
    if scheme.block is not None and isinstance(layer, RowParallelLinear) and layer.in_start % group:
        raise ValueError(f"FP8 blocks of {group} columns do not split at this rank's input start {layer.in_start} "
                         f"(tensor parallelism must cut a row-parallel layer at block edges)")
    scale_shape = (n,) if scheme.block is None else (n, math.ceil(k / group))

    def load_weight(param: nn.Parameter, full: Any, shard_id: Any = None) -> None:
        if checkpoint_dtype(full) == FP8:
            if scheme.dynamic:
                raise ValueError(f"an FP8 layer ({type(layer).__name__} {n}x{k}) got an FP8 tensor: quantization='fp8' "
                                 "quantizes float (bf16/fp16/float32) weights as they load; send those")
            own(param, full, shard_id)  # an FP8 checkpoint's weight; its weight_scale comes as a tensor of its own
            return
        # A float tensor: the float checkpoint of quantization="fp8", or new weights of an RL step
        # (update_weights_from_*), quantized on the device as a load does, into this layer's scale layout.
        q, s = quantize_float(_read(full).to(device), None if scheme.block is None else group)
        own(param, q, shard_id)
        if isinstance(layer, RowParallelLinear) and s.dim() == 2:  # columns split: this rank's groups
            layer.weight_scale.data.copy_(s.narrow(1, layer.in_start // group, layer.weight_scale.shape[1]))
        else:
            own(layer.weight_scale, s, shard_id)

    layer.weight = param_with_loader(torch.empty(n, k, dtype=FP8, device=device), load_weight)
    scale = torch.ones(scale_shape, dtype=torch.float32, device=device)
    if scheme.dynamic:  # filled with the weight, not read from the checkpoint
        layer.register_buffer("weight_scale", scale, persistent=False)
    else:
        layer.weight_scale = param_with_loader(scale, partial(load_scale, layer, scheme))
    layer.quant = Fp8Linear(layer.weight, layer.weight_scale, group)
    layer.quant.dtype = torch.get_default_dtype()  # the model's (models are built under it): for float again


@contextmanager
def building(scheme: Optional[Fp8Scheme]) -> Iterator[None]:
    """Every linear layer built inside is FP8 (``convert``); nothing happens for ``scheme`` None."""
    if scheme is None:
        yield
        return
    linear.on_new_layer = lambda layer: convert(layer, scheme)
    try:
        yield
    finally:
        linear.on_new_layer = None


def fp8_layers(model: nn.Module) -> list[LinearBase]:
    return [m for m in model.modules() if isinstance(m.__dict__.get("quant"), Fp8Linear)]


def use_pdl(model: nn.Module, pdl: bool) -> None:
    """The FP8 layers' one-token GEMVs launch with PDL too (``model_loader.select_gemv``)."""
    for layer in fp8_layers(model):
        layer.quant.pdl = pdl


def checkpoint_tensors(weights: Iterator[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    """The checkpoint's tensors under the parameters' names (``weight_scale_inv`` is ``weight_scale``),
    static activation scales left out."""
    for name, tensor in weights:
        prefix, _, part = name.rpartition(".")
        if part in SKIPPED:
            continue
        yield (f"{prefix}.{SCALE_NAMES[part]}" if part in SCALE_NAMES else name), tensor


@torch.no_grad()
def dummy_weights(model: nn.Module, seed: int, std: float) -> None:
    """Seeded N(0, ``std``) weights for the FP8 layers (``load_format="dummy"``: FP8 cannot be drawn
    directly), drawn in float on the device one layer at a time and quantized per row."""
    gen = None
    for layer in fp8_layers(model):
        if gen is None:
            gen = torch.Generator(device=layer.weight.device).manual_seed(seed + 1)
        w = torch.empty(layer.weight.shape, dtype=torch.bfloat16, device=layer.weight.device)
        q, s = quantize_rows(w.normal_(0.0, std, generator=gen))
        layer.weight.copy_(q)
        layer.weight_scale.copy_(s if layer.weight_scale.dim() == 1 else s[:, None].expand_as(layer.weight_scale))


@torch.no_grad()
def finish(model: nn.Module) -> None:
    """Off CUDA, the FP8 layers become float layers on their dequantized weights (see the module).
    New float weights (``update_weights_from_*``) then take the same round trip through FP8 as
    they load (``round_trip``): the numbers a GPU would serve after the update."""
    for layer in fp8_layers(model):
        if not layer.weight.is_cuda:
            quant = layer.quant
            w = dequantize(layer.weight.data, layer.weight_scale.data, quant.group).to(quant.dtype)
            group = None if quant.per_row else quant.group
            del layer.weight_scale, layer.quant
            layer.weight = param_with_loader(w, partial(round_trip, type(layer).weight_loader.__get__(layer), group))


def round_trip(own: Any, group: Optional[int], param: nn.Parameter, full: Any, shard_id: Any = None) -> None:
    """A CPU FP8 layer's weight loader (after ``finish``): a float tensor quantized as the GPU's
    layer would hold it, dequantized, then loaded by the layer's own loader. FP8 tensors are
    refused: the CPU runs float layers, and an FP8 weight needs its scales at once."""
    if checkpoint_dtype(full) == FP8:
        raise ValueError(f"an FP8 tensor of shape {tuple(full.shape)} for a layer that runs dequantized on the CPU: "
                         "update an FP8 model there with float (bf16/fp16/float32) weights, which are quantized "
                         "as they load")
    w = _read(full).to(param.device)
    q, s = quantize_float(w, group)
    own(param, dequantize(q, s, group or w.shape[1]).to(param.dtype), shard_id)
