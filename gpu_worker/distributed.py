"""Tensor-parallel state of this worker process.

Layers read the rank/size at construction time (to size their shards) and call the collectives
at run time. The default torch.distributed group is the TP group: a worker process runs one
model, so there is nothing else to share it with.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_TP_RANK = 0
_TP_SIZE = 1


def init_tp(rank: int, size: int, device: torch.device) -> None:
    """Record the TP coordinates; join the process group (env:// rendezvous) if nobody did yet."""
    global _TP_RANK, _TP_SIZE
    if not 0 <= rank < size:
        raise ValueError(f"tp_rank {rank} out of range for tp_size {size}")
    _TP_RANK, _TP_SIZE = rank, size
    if size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=size)


def tp_rank() -> int:
    return _TP_RANK


def tp_size() -> int:
    return _TP_SIZE


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum partial results of a row-parallel matmul (a no-op without TP)."""
    if _TP_SIZE > 1:
        dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate the ranks' shards along the last dim (vocab-parallel logits)."""
    if _TP_SIZE == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_TP_SIZE)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)
