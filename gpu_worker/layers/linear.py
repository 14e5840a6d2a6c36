"""Tensor-parallel linear layers (Megatron split), each holding only its rank's shard.

Every parameter carries a ``weight_loader(param, full_tensor, shard_id=None)`` that slices the
full checkpoint tensor for this rank, so model loaders never do TP arithmetic themselves.
Merged layers (fused qkv, fused gate/up) take one HF tensor per ``shard_id``.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from treadle.gpu_worker.distributed import all_reduce, tp_rank, tp_size


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class LinearBase(nn.Module):
    """``y = x W^T + b`` over a [out, in] weight shard; subclasses decide the sharding."""

    def __init__(self, in_size: int, out_size: int, bias: bool):
        super().__init__()
        self.in_size, self.out_size = in_size, out_size
        self.weight = _param(out_size, in_size)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = _param(out_size)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, full: torch.Tensor, shard_id=None) -> None:
        param.data.copy_(full)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


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


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection, split by heads; KV heads are replicated when tp_size > num_kv_heads."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False):
        tp = tp_size()
        if num_heads % tp or (num_kv_heads % tp and tp % num_kv_heads):
            raise ValueError(f"heads {num_heads}/{num_kv_heads} cannot be split over tp_size {tp}")
        self.head_dim = head_dim
        self.num_heads = num_heads // tp
        self.num_kv_heads = max(1, num_kv_heads // tp)
        self.kv_replicas = max(1, tp // num_kv_heads)
        self.q_size, self.kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        LinearBase.__init__(self, hidden, self.q_size + 2 * self.kv_size, bias)

    def weight_loader(self, param: nn.Parameter, full: torch.Tensor, shard_id: Union[str, None] = None) -> None:
        if shard_id is None:  # fused checkpoint tensor in full-model order [q | k | v]
            q, k, v = full.split([self.q_size * tp_size(), *[self.kv_size * tp_size() // self.kv_replicas] * 2])
            for sid, part in zip("qkv", (q, k, v)):
                self.weight_loader(param, part, sid)
            return
        if shard_id == "q":
            off, size, src = 0, self.q_size, tp_rank()
        else:
            off = self.q_size if shard_id == "k" else self.q_size + self.kv_size
            size, src = self.kv_size, tp_rank() // self.kv_replicas
        param.data.narrow(0, off, size).copy_(full.narrow(0, src * size, size))


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial products are summed with an all-reduce."""

    def __init__(self, in_size: int, out_size: int, bias: bool = False):
        if in_size % tp_size():
            raise ValueError(f"input size {in_size} not divisible by tp_size {tp_size()}")
        super().__init__(in_size // tp_size(), out_size, bias)

    def weight_loader(self, param: nn.Parameter, full: torch.Tensor, shard_id=None) -> None:
        if param.dim() == 1:  # bias: replicated, added once after the reduce
            param.data.copy_(full)
            return
        n = param.shape[1]
        param.data.copy_(full.narrow(1, tp_rank() * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias
