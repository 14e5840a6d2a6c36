"""Tensor-parallel linear layers (Megatron split), each holding only its rank's shard.

Every parameter carries a ``weight_loader(param, full_tensor, shard_id=None)`` that slices the
full checkpoint tensor for this rank, so model loaders never do TP arithmetic themselves.
Merged layers (fused qkv, fused gate/up) take one HF tensor per ``shard_id``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch import nn

from treadle.gpu_worker.distributed import all_reduce, tp_rank, tp_size
from treadle.gpu_worker.fused_reduce import gemv_push_target, note_pushed
from treadle.gpu_worker.layers.embedding import ParallelLMHead
from treadle.gpu_worker.layers.triton_gemv import GemvConfig, gemv_config, project, takes_gemv
from treadle.runtime.model_check import head_split_error


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


_QUANT: Optional[Any] = None  # the quantized weight format of the layers being built (quantized_layers)


@contextmanager
def quantized_layers(method: Optional[Any]) -> Iterator[None]:
    """Linear layers built inside hold their weight in ``method``'s format instead of a dense
    ``weight`` (``gpu_worker/quant``): ``method.create_weights(layer)`` registers its parameters
    (each with its ``weight_loader``) and returns True, or False to leave the layer dense;
    ``method.apply(layer, x, bias)`` is the layer's product. None: dense layers."""
    global _QUANT
    old, _QUANT = _QUANT, method
    try:
        yield
    finally:
        _QUANT = old


# Set while an FP8 model is built (``gpu_worker/fp8.py``): called with each new dense layer, it may
# give the layer a quantized weight of its own, ``layer.quant``, whose ``apply(layer, x, bias)`` is then
# the product (as a ``quantized_layers`` method's is).
on_new_layer: Optional[Callable[["LinearBase"], None]] = None


def use_triton_gemv(model: nn.Module, pdl: bool) -> int:
    """Give every linear layer and LM head of ``model`` with a dense CUDA weight a GEMV config, so
    their one-token products (batch-1 decode) run on the Triton GEMV, launched with PDL if ``pdl``.
    Returns how many layers got one."""
    count = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if (isinstance(m, (LinearBase, ParallelLMHead)) and w is not None and w.is_cuda and w.is_contiguous()
                and w.dtype in (torch.bfloat16, torch.float16, torch.float32)):
            m.gemv_config = gemv_config(w.shape[0], w.shape[1], pdl)
            count += 1
    return count


class LinearBase(nn.Module):
    """``y = x W^T + b`` over a [out, in] weight shard; subclasses decide the sharding."""

    gemv_config: Optional[GemvConfig] = None  # set by use_triton_gemv
    quant: Optional[Any] = None  # a quantized weight format (quantized_layers); None: a dense weight

    def __init__(self, in_size: int, out_size: int, bias: bool):
        super().__init__()
        self.in_size, self.out_size = in_size, out_size
        if _QUANT is not None and _QUANT.create_weights(self):
            self.quant = _QUANT
        else:
            self.weight = _param(out_size, in_size)
            self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = _param(out_size)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        if on_new_layer is not None:
            on_new_layer(self)

    def weight_loader(self, param: nn.Parameter, full: torch.Tensor, shard_id=None) -> None:
        param.data.copy_(full[:])  # [:] also reads a loader.CheckpointTensor (not read yet) whole

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant is not None:
            y = self.quant.apply(self, x, self.bias)
        else:
            y = project(x, self.weight, self.bias, self.gemv_config)
        lora = self.__dict__.get("lora")  # lora.LoRAPool's; not getattr: a miss costs nn.Module ~1 us
        return y if lora is None else lora.apply(x, y)


ReplicatedLinear = LinearBase


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; no communication (the next layer consumes the shard)."""

    def __init__(self, in_size: int, out_size: int, bias: bool = False):
        if out_size % tp_size():
            raise ValueError(f"output size {out_size} not divisible by tp_size {tp_size()}")
        super().__init__(in_size, out_size // tp_size(), bias)

    def weight_loader(self, param: nn.Parameter, full: torch.Tensor, shard_id=None) -> None:
        n = param.shape[0]
        param.data.copy_(full.narrow(0, tp_rank() * n, n))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs fused in one matmul (gate_proj + up_proj)."""

    def __init__(self, in_size: int, out_sizes: list[int], bias: bool = False):
        self.out_sizes = list(out_sizes)
        super().__init__(in_size, sum(out_sizes), bias)

    def weight_loader(self, param: nn.Parameter, full: torch.Tensor, shard_id: Optional[int] = None) -> None:
        if shard_id is None:  # an already fused checkpoint tensor
            for i, part in enumerate(full.split(self.out_sizes, dim=0)):
                self.weight_loader(param, part, i)
            return
        tp = tp_size()
        size, off = self.out_sizes[shard_id] // tp, sum(self.out_sizes[:shard_id]) // tp
        param.data.narrow(0, off, size).copy_(full.narrow(0, tp_rank() * size, size))


def head_partition(num_heads: int, num_kv_heads: int, tp: int, rank: int) -> tuple[int, int, int, int]:
    """This rank's ``(q_start, q_count, kv_start, kv_count)`` in heads.

    KV heads are split as evenly as possible (3 KV heads over 2 ranks: 2 and 1), each rank taking
    the query heads of its KV heads, so models whose head counts do not divide ``tp_size`` (like
    SmolLM2-135M's 9/3) still shard. With fewer KV heads than ranks, KV heads are replicated.
    """
    problem = head_split_error(num_heads, num_kv_heads, tp)  # also checked before any process starts
    if problem:
        raise ValueError(problem)
    group = num_heads // num_kv_heads
    if num_kv_heads >= tp:
        base, extra = divmod(num_kv_heads, tp)
        kv_count = base + (rank < extra)
        kv_start = rank * base + min(rank, extra)
        return kv_start * group, kv_count * group, kv_start, kv_count
    q_count = num_heads // tp
    return rank * q_count, q_count, rank // (tp // num_kv_heads), 1


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection, split by heads (see ``head_partition``)."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False):
        q_start, q_count, kv_start, kv_count = head_partition(num_heads, num_kv_heads, tp_size(), tp_rank())
        self.head_dim = head_dim
        self.num_heads, self.num_kv_heads = q_count, kv_count
        self.q_start, self.kv_start = q_start * head_dim, kv_start * head_dim
        self.full_sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
        self.q_size, self.kv_size = q_count * head_dim, kv_count * head_dim
        LinearBase.__init__(self, hidden, self.q_size + 2 * self.kv_size, bias)

    def weight_loader(self, param: nn.Parameter, full: torch.Tensor, shard_id: Union[str, None] = None) -> None:
        if shard_id is None:  # fused checkpoint tensor in full-model order [q | k | v]
            for sid, part in zip("qkv", full.split(self.full_sizes)):
                self.weight_loader(param, part, sid)
            return
        if shard_id == "q":
            off, size, src = 0, self.q_size, self.q_start
        else:
            off = self.q_size if shard_id == "k" else self.q_size + self.kv_size
            size, src = self.kv_size, self.kv_start
        param.data.narrow(0, off, size).copy_(full.narrow(0, src, size))


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial products are summed with an all-reduce.

    ``in_split=(start, size)`` gives this rank's input slice when it is not an even share
    (the attention output projection follows ``head_partition``).
    """

    def __init__(self, in_size: int, out_size: int, bias: bool = False, in_split: Optional[tuple[int, int]] = None):
        if in_split is None:
            if in_size % tp_size():
                raise ValueError(f"input size {in_size} not divisible by tp_size {tp_size()}")
            in_split = (tp_rank() * (in_size // tp_size()), in_size // tp_size())
        self.in_start = in_split[0]
        super().__init__(in_split[1], out_size, bias)
        # False: forward returns this rank's partial sum and the next RMSNorm reduces it (fused).
        self.reduce_results = True

    def weight_loader(self, param: nn.Parameter, full: torch.Tensor, shard_id=None) -> None:
        if param.dim() == 1:  # bias: replicated, added once after the reduce
            param.data.copy_(full[:])  # [:] reads a loader.CheckpointTensor whole
            return
        param.data.copy_(full.narrow(1, self.in_start, param.shape[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora = self.__dict__.get("lora")
        # A one-token partial sum that the next norm reduces may travel to the peers with the GEMV
        # itself (not with LoRA: its delta is added after the GEMV).
        push = None
        if not self.reduce_results and lora is None and takes_gemv(x, self.gemv_config):
            push = gemv_push_target(self.weight.shape[0], x.dtype)
        if self.quant is not None:
            y = self.quant.apply(self, x, None)
        else:
            y = project(x, self.weight, None, self.gemv_config, push)
        if push is not None:
            note_pushed(y)
        if lora is not None:  # on the partial sum: the reduce sums the ranks' (x_r A_r^T) B^T into x A^T B^T
            y = lora.apply(x, y)
        if not self.reduce_results:
            return y  # partial: no bias here (the model only defers the reduce of bias-free layers)
        y = all_reduce(y)
        return y if self.bias is None else y + self.bias
