"""Parallel state of this worker process: its TP and PP coordinates and the groups they use.

One worker process per rank, ``rank = pp_rank * tp_size + tp_rank``. Every rank joins one
torch.distributed world (gloo on CPU, NCCL on CUDA; env:// rendezvous on MASTER_ADDR/MASTER_PORT,
which the engine derives from ``dist_init_addr`` when ranks span machines). The TP ranks of each
pipeline stage get their own subgroup for the layers' all_reduce/all_gather; stages talk point to
point over the world (``gpu_worker/pipeline.py``). Layers read the coordinates at construction (to
size their shards and pick their layers) and call the collectives at run time.

Small all-reduces (decode: a few KB to 2 MB a layer) are latency-bound: 65 a step on an 8B model.
On CUDA, when every TP rank of the stage is on this machine, they go through a one-shot
all-reduce over PyTorch symmetric memory: each rank copies its part into a buffer that all ranks
map, and reads and sums its peers' parts over NVLink in one kernel (barriers at both ends, so the
buffer is reused safely; graph-capturable). Larger tensors (prefill) keep NCCL;
``disable_custom_all_reduce`` turns it off. On two H100s it measured as NCCL did (about 13 us a
call inside a decode graph), which is why the reduce can also move into the RMSNorm that follows
(``fused_reduce.fused_all_reduce_rms_norm``, ``enable_allreduce_fusion``): one launch instead of
two. That path's shared buffers and calls (and the batch-1 pushes) are ``fused_reduce.py``'s; this
module sets them up with the one-shot buffer.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.distributed as dist

from treadle.gpu_worker import fused_reduce
from treadle.gpu_worker.layers import batch_invariant

logger = logging.getLogger(__name__)

_TP_RANK, _TP_SIZE, _PP_RANK, _PP_SIZE = 0, 1, 0, 1
_TP_GROUP: Optional[dist.ProcessGroup] = None  # None: the world is the TP group (pp_size == 1)
_SYMM_BUF: Optional[torch.Tensor] = None  # the one-shot all-reduce's shared buffer (None: NCCL only)
_SYMM_GROUP = ""  # its group's name


def symm_max_bytes(world: int) -> int:
    """Largest all-reduce the one-shot path takes: each rank reads ``world`` copies of it, so the
    crossover with NCCL's ring comes earlier the more ranks there are."""
    return (2 << 20) if world <= 2 else (512 << 10)


def init_parallel(tp_rank: int, tp_size: int, device: torch.device, pp_rank: int = 0, pp_size: int = 1,
                  dtype: torch.dtype = torch.bfloat16, custom_all_reduce: bool = False,
                  allreduce_fusion: bool = False) -> None:
    """Record the coordinates; join the world (if nobody did yet) and build the per-stage TP groups.

    ``custom_all_reduce``: the caller vouches that the stage's TP ranks share this machine; then
    small ``dtype`` all-reduces use the one-shot symmetric-memory path on CUDA, and with
    ``allreduce_fusion`` (no pipeline stages) the reduce before each RMSNorm runs inside the norm's
    kernel.
    """
    global _TP_RANK, _TP_SIZE, _PP_RANK, _PP_SIZE, _TP_GROUP, _SYMM_BUF, _SYMM_GROUP
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} out of range for tp_size {tp_size}")
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pp_rank {pp_rank} out of range for pp_size {pp_size}")
    _TP_RANK, _TP_SIZE, _PP_RANK, _PP_SIZE = tp_rank, tp_size, pp_rank, pp_size
    world = tp_size * pp_size
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=global_rank(), world_size=world)
    _TP_GROUP = None
    if tp_size > 1 and pp_size > 1:  # every rank must create every group, in the same order
        groups = [dist.new_group(list(range(s * tp_size, (s + 1) * tp_size))) for s in range(pp_size)]
        _TP_GROUP = groups[pp_rank]
    _SYMM_BUF, _SYMM_GROUP = None, ""
    fused_reduce.set_state(None)
    if custom_all_reduce and tp_size > 1 and device.type == "cuda":
        _init_symm(device, dtype, allreduce_fusion and pp_size == 1)


def _init_symm(device: torch.device, dtype: torch.dtype, fusion: bool) -> None:
    """Allocate and map the one-shot buffers on every TP rank (a collective: all ranks or none)."""
    global _SYMM_BUF, _SYMM_GROUP
    try:
        import torch.distributed._symmetric_memory as symm_mem

        group = _TP_GROUP or dist.group.WORLD
        buf = symm_mem.empty(symm_max_bytes(_TP_SIZE) // dtype.itemsize, dtype=dtype, device=device)
        symm_mem.rendezvous(buf, group.group_name)
        fused = fused_reduce.FusedNormState(symm_mem, group.group_name, device, dtype, _TP_RANK, _TP_SIZE,
                                            symm_max_bytes(_TP_SIZE) // dtype.itemsize) if fusion else None
        torch.cuda.synchronize(device)
        dist.barrier(group=group)  # every rank's flags are zero before any kernel may write a peer's
        _SYMM_BUF, _SYMM_GROUP = buf, group.group_name
        fused_reduce.set_state(fused)
    except Exception as e:  # an older torch, or GPUs without peer access: NCCL does it all
        logger.warning("one-shot all-reduce unavailable (%s: %s); using NCCL for every all-reduce",
                       type(e).__name__, e)


def tp_rank() -> int:
    return _TP_RANK


def tp_size() -> int:
    return _TP_SIZE


def pp_rank() -> int:
    return _PP_RANK


def pp_size() -> int:
    return _PP_SIZE


def global_rank(tp: Optional[int] = None, pp: Optional[int] = None) -> int:
    """The world rank of (pp, tp), this process's own by default."""
    return (_PP_RANK if pp is None else pp) * _TP_SIZE + (_TP_RANK if tp is None else tp)


def broadcast_int(value: int, device: torch.device) -> int:
    """Rank 0's value on every rank: each machine resolves its own random seed, the ranks must agree."""
    if _TP_SIZE * _PP_SIZE == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return int(t.item())


def tp_broadcast(x: torch.Tensor) -> torch.Tensor:
    """TP rank 0's ``x`` on every TP rank of this stage, in place (every rank passes the same shape)."""
    if _TP_SIZE > 1:
        dist.broadcast(x, src=global_rank(tp=0), group=_TP_GROUP)
    return x


def first_failed_rank(failed: bool, device: torch.device) -> Optional[int]:
    """The lowest world rank that reports ``failed`` (None: none did). Every rank must call it,
    in the same order: control calls that change state on all ranks agree through it."""
    world = _TP_SIZE * _PP_SIZE
    if world == 1:
        return 0 if failed else None
    t = torch.tensor([global_rank() if failed else world], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return None if int(t.item()) == world else int(t.item())


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum partial results of a row-parallel matmul over this stage's TP ranks (a no-op without TP).
    A row its kernel pushed to the peers (``fused_reduce.note_pushed``) is summed from the words they pushed."""
    if _TP_SIZE == 1:
        return x
    if _TP_SIZE > 2 and batch_invariant.ENABLED:
        return _ordered_all_reduce(x)
    if fused_reduce.push_pending():
        return fused_reduce.pull_pushed(x)
    buf = _SYMM_BUF
    if (buf is not None and x.dtype == buf.dtype and x.is_contiguous() and x.numel() <= buf.numel()
            and (x.numel() * x.element_size()) % 16 == 0 and (x.storage_offset() * x.element_size()) % 16 == 0):
        flat = x.view(-1)
        torch.ops.symm_mem.one_shot_all_reduce_copy_out(buf[: x.numel()], flat, "sum", _SYMM_GROUP, flat)
        return x
    dist.all_reduce(x, group=_TP_GROUP)
    return x


def _ordered_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """enable_deterministic_inference with more than two ranks: the ranks' parts summed in rank order,
    whatever the message size (NCCL's and gloo's order follows it; two parts are order-free)."""
    parts = [torch.empty_like(x) for _ in range(_TP_SIZE)]
    dist.all_gather(parts, x.contiguous(), group=_TP_GROUP)
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return x.copy_(total)


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate the stage's TP shards along the last dim (vocab-parallel logits)."""
    if _TP_SIZE == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_TP_SIZE)]
    dist.all_gather(parts, x.contiguous(), group=_TP_GROUP)
    return torch.cat(parts, dim=-1)
