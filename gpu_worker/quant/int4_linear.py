"""AWQ / GPTQ linear layers that keep their weight packed (4 bits a weight) on the device.

``Int4Method`` is the ``layers.linear.quantized_layers`` format of a 4-bit checkpoint. While it
loads, a layer holds this rank's shard as ``qweight`` int32 ``[K/8, N]`` (nibble ``i`` of word row
``r`` is input ``8r + i``: GPTQ's own packing; AWQ's is repacked), ``scales`` ``[K/G, N]`` in the
checkpoint's dtype and ``qzeros`` uint8 ``[K/G, N]`` (the real zero point, 0..16). ``finish`` then
puts them in the K-major layout the Triton kernels stream (``layers/triton_int4.py``):

- ``qweight`` ``[N, K/8]`` (``int4_format.pack_kmajor``: one output's words contiguous, read as
  16-byte vectors of 32 inputs), ``scales`` and ``qzeros`` ``[N, K/G]``; zero points dropped
  where all are 8 (symmetric GPTQ);
- with GPTQ ``desc_act``, the inputs sorted by group at ``finish``, and ``int4_perm`` to gather
  the activations in that order (one ``index_select`` before the product).

Loading takes each checkpoint part whole, unpacks it to the logical shapes (``int4_format``),
slices this rank's rows (row-parallel: inputs) and columns (column-parallel and the fused q/k/v
and gate/up layers: outputs, each part at its offset), and packs the codes again. A row split
that cuts through a group is refused when the layer is built (with act order, at ``finish``,
once ``g_idx`` says where the groups are). The CPU never builds these layers
(it dequantizes at load: ``int4_format.dequantized``), except in tests, where ``apply`` falls back
to dequantize-then-matmul.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from treadle.gpu_worker.distributed import tp_rank, tp_size
from treadle.gpu_worker.layers import batch_invariant
from treadle.gpu_worker.layers.linear import (ColumnParallelLinear, LinearBase, MergedColumnParallelLinear,
                                              QKVParallelLinear)
from treadle.gpu_worker.layers.triton_int4 import int4_matmul
from treadle.gpu_worker.quant.int4_format import (Int4Config, dequantize, logical, pack_kmajor, pack_rows,
                                                  unpack_kmajor, unpack_rows)
from treadle.gpu_worker.quant.not_converted import fused_parts, not_converted, part_names


def out_slices(layer: LinearBase, shard_id: Any, full_out: int) -> list[tuple[int, int, int]]:
    """``(dst, src, size)`` output columns: this rank's columns ``[src, src+size)`` of a checkpoint
    part with ``full_out`` outputs go to ``[dst, dst+size)`` of the layer (as the dense loaders
    in ``layers/linear.py`` slice rows of ``[out, in]``)."""
    tp, rank = tp_size(), tp_rank()
    if isinstance(layer, QKVParallelLinear):
        if shard_id is None:  # a fused [q | k | v] checkpoint tensor
            starts = [0, layer.full_sizes[0], layer.full_sizes[0] + layer.full_sizes[1]]
            return [(d, s + base, n) for sid, base in zip("qkv", starts) for d, s, n in out_slices(layer, sid, 0)]
        if shard_id == "q":
            return [(0, layer.q_start, layer.q_size)]
        dst = layer.q_size if shard_id == "k" else layer.q_size + layer.kv_size
        return [(dst, layer.kv_start, layer.kv_size)]
    if isinstance(layer, MergedColumnParallelLinear):
        if shard_id is None:  # a fused [gate | up] checkpoint tensor
            bases = [sum(layer.out_sizes[:i]) for i in range(len(layer.out_sizes))]
            return [(d, s + base, n) for i, base in enumerate(bases) for d, s, n in out_slices(layer, i, 0)]
        size = layer.out_sizes[shard_id] // tp
        return [(sum(layer.out_sizes[:shard_id]) // tp, rank * size, size)]
    if isinstance(layer, ColumnParallelLinear):
        return [(0, rank * layer.out_size, layer.out_size)]
    return [(0, 0, full_out)]


def _group(cfg: Int4Config, k: int) -> int:
    return k if cfg.group_size == -1 else cfg.group_size


class Int4Method:
    """The 4-bit format of a model's linear layers (``layers.linear.quantized_layers``)."""

    def __init__(self, cfg: Int4Config):
        self.cfg = cfg

    def create_weights(self, layer: LinearBase) -> bool:
        k, n, cfg = layer.in_size, layer.out_size, self.cfg
        g = _group(cfg, k)
        in_start = getattr(layer, "in_start", 0)
        if k % 32:  # (the kernels' 16-byte blocks of 32 inputs)
            raise ValueError(f"{cfg.method.upper()}: a layer's {k} inputs on this rank are not a multiple of 32")
        if not cfg.desc_act and cfg.group_size != -1 and (k % g or in_start % g):
            raise ValueError(f"{cfg.method.upper()} group_size {g}: this rank's inputs [{in_start}, {in_start + k}) "
                             f"of a {type(layer).__name__} cut through a group (tp_size {tp_size()}); quantization "
                             "groups must not straddle a tensor-parallel rank boundary: use a smaller tp_size")
        groups = max(1, k // g)
        params = {"qweight": torch.empty(k // 8, n, dtype=torch.int32),
                  "qzeros": torch.empty(groups, n, dtype=torch.uint8),
                  "scales": torch.empty(groups, n, dtype=torch.float16)}
        if cfg.desc_act:
            params["g_idx"] = torch.empty(k, dtype=torch.int64)
        for name, t in params.items():
            p = nn.Parameter(t, requires_grad=False)
            p.weight_loader = partial(self.load, layer, name)
            p.dummy_init = partial(self.dummy_init, name, g)
            layer.register_parameter(name, p)
        layer.int4_group, layer.int4_perm, layer.int4_gidx_set = g, None, False
        return True

    # ---- loading -------------------------------------------------------------------------------
    def load(self, layer: LinearBase, part: str, param: nn.Parameter, full: Any, shard_id: Any = None) -> None:
        """One checkpoint part (``full``: the whole tensor of all ranks) into this rank's shard."""
        t = logical(self.cfg, part, full[:].to(param.device))
        k, in_start = layer.in_size, getattr(layer, "in_start", 0)
        if part == "g_idx":  # fused q/k/v (gate/up) parts share their input, so their act order too
            t = t[in_start:in_start + k]
            if layer.int4_gidx_set and not torch.equal(param.data, t):
                raise ValueError(f"GPTQ desc_act: the parts fused in a {type(layer).__name__} have different g_idx")
            param.data.copy_(t)
            layer.int4_gidx_set = True
            return
        if part == "qweight":
            t = t[in_start:in_start + k]
        elif t.shape[0] > 1 and not self.cfg.desc_act:  # per-group rows: this rank's groups
            g = layer.int4_group
            t = t[in_start // g:(in_start + k) // g]
        if part == "scales" and param.dtype != t.dtype:  # keep the checkpoint's scales exactly
            param.data = torch.empty(param.shape, dtype=t.dtype, device=param.device)
        if t.shape[0] != (param.shape[0] * 8 if part == "qweight" else param.shape[0]):
            if part == "qweight" or not self.cfg.desc_act:
                raise ValueError(f"{self.cfg.method.upper()} {part} of shape {tuple(full.shape)} does not fit a "
                                 f"{type(layer).__name__} of {layer.in_size} inputs x {layer.out_size} outputs")
            param.data = torch.empty((t.shape[0], param.shape[1]), dtype=t.dtype, device=param.device)  # all groups
        for dst, src, size in out_slices(layer, shard_id, t.shape[1]):
            if src + size > t.shape[1] or dst + size > param.shape[1]:
                raise ValueError(f"{self.cfg.method.upper()} {part} of shape {tuple(full.shape)} does not fit a "
                                 f"{type(layer).__name__} with {layer.out_size} outputs on this rank")
            piece = t[:, src:src + size]
            param.data[:, dst:dst + size].copy_(pack_rows(piece) if part == "qweight" else piece)

    def dummy_init(self, part: str, group: int, p: nn.Parameter, gen: torch.Generator, std: float) -> None:
        """Random packed weights made in place on the device (no dense copy): codes uniform, scales
        ``std / 4``, so the weights spread about as N(0, std) would; zero points 7..9 for AWQ (so
        the kernels read them, as for a real checkpoint), 8 for GPTQ (symmetric: dropped)."""
        if part == "qweight":
            p.random_(-2 ** 31, 2 ** 31 - 1, generator=gen)
        elif part == "qzeros" and self.cfg.method == "awq":
            p.random_(7, 10, generator=gen)
        elif part == "qzeros":
            p.fill_(8)
        elif part == "scales":
            p.fill_(std / 4)
        else:  # g_idx: position order
            p.copy_(torch.arange(p.shape[0], device=p.device) // group)

    def finish(self, layer: LinearBase) -> None:
        """After loading: sort desc_act inputs by group (``int4_perm`` gathers the activations to
        match), drop all-8 zero points (the kernels then skip reading them) and transpose every
        part to ``[N, .]``."""
        g, k = layer.int4_group, layer.in_size
        if self.cfg.desc_act:
            g_idx = layer.g_idx.data
            perm = torch.argsort(g_idx, stable=True)
            first = int(g_idx[perm[0]])
            want = first + torch.arange(k, device=g_idx.device) // g
            if not torch.equal(g_idx[perm], want):
                raise ValueError(f"GPTQ desc_act: the {k} inputs of a {type(layer).__name__} on this rank do not form "
                                 f"whole groups of {g} (tp_size {tp_size()}): groups must not straddle a "
                                 "tensor-parallel rank boundary; use tp_size 1 or a checkpoint without desc_act")
            if not torch.equal(perm, torch.arange(k, device=perm.device)):
                layer.qweight.data = pack_rows(unpack_rows(layer.qweight.data)[perm])
                layer.int4_perm = perm.to(torch.int32)
            rows = slice(first, first + k // g)
            layer.scales.data, layer.qzeros.data = layer.scales.data[rows].contiguous(), layer.qzeros.data[rows].contiguous()
            del layer._parameters["g_idx"]
        if bool((layer.qzeros.data == 8).all()):
            del layer._parameters["qzeros"]
            layer.qzeros = None
        layer.qweight.data = pack_kmajor(unpack_rows(layer.qweight.data))  # the kernels' K-major layout
        for p in (layer.scales, layer.qzeros):
            if p is not None:
                p.data = p.data.t().contiguous()

    # ---- the product ---------------------------------------------------------------------------
    def weight(self, layer: LinearBase) -> torch.Tensor:
        """The layer's ``[out, in]`` float32 weight (in kernel input order; after ``finish``): the
        reference."""
        zeros = None if layer.qzeros is None else layer.qzeros.t()
        return dequantize(unpack_kmajor(layer.qweight), zeros, layer.scales.t())

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if layer.int4_perm is not None:
            x2 = x2.index_select(1, layer.int4_perm)
        if batch_invariant.ENABLED:  # enable_deterministic_inference: dequantized, through the batch-invariant matmul
            y = batch_invariant.linear(x2, self.weight(layer).to(x.dtype), bias)
        elif x2.is_cuda:
            y = int4_matmul(x2, layer.qweight, layer.scales, layer.qzeros, layer.int4_group)
            if bias is not None:
                y = y + bias
        else:
            y = F.linear(x2, self.weight(layer).to(x.dtype), bias)
        return y.reshape(*shape[:-1], y.shape[-1])


def int4_layers(model: nn.Module) -> list[LinearBase]:
    """The model's 4-bit linear layers (none where it was built dense, e.g. on the CPU)."""
    return [m for m in model.modules() if isinstance(m, LinearBase) and isinstance(m.quant, Int4Method)]


def finish_int4(model: nn.Module) -> int:
    """``Int4Method.finish`` on every 4-bit layer of a loaded model; returns how many."""
    layers = int4_layers(model)
    for m in layers:
        m.quant.finish(m)
    return len(layers)


def restore_dense(model: nn.Module, dtype: torch.dtype) -> int:
    """The 4-bit layers a checkpoint keeps dense (``modules_to_not_convert``: ``not_converted.py``)
    get a dense ``weight`` of ``dtype`` again, loaded by the layer's own loader; returns how many.
    A fused layer (``qkv_proj``) whose parts are of both kinds is a ValueError: one layer has one
    format on the GPU."""
    count, fused = 0, fused_parts(model)
    for name, layer in model.named_modules():
        if not (isinstance(layer, LinearBase) and isinstance(layer.quant, Int4Method) and layer.quant.cfg.skip):
            continue
        parts = part_names(fused, name)
        dense = [p for p in parts if not_converted(p, layer.quant.cfg.skip)]
        if not dense:
            continue
        if len(dense) < len(parts):
            raise ValueError(f"{layer.quant.cfg.method.upper()} modules_to_not_convert keeps {dense} dense but not "
                             f"{sorted(set(parts) - set(dense))}; they are fused in {name!r}, which must be all 4-bit "
                             "or all dense")
        device = layer.qweight.device
        for part in ("qweight", "qzeros", "scales", "g_idx"):
            layer._parameters.pop(part, None)
        layer.quant = None
        layer.weight = nn.Parameter(torch.empty(layer.out_size, layer.in_size, dtype=dtype, device=device),
                                    requires_grad=False)
        layer.weight.weight_loader = layer.weight_loader
        count += 1
    return count
