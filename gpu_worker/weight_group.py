"""``update_weights_from_distributed`` on the worker's side: a process group shared with a trainer,
whose rank 0 broadcasts the new weights into every engine worker (NCCL on GPUs, gloo on CPUs).

The group is separate from the engine's own tensor-parallel group: it has its own rendezvous (a
TCP store the trainer's rank 0 hosts at ``master_address:master_port``), and its keys live under
``group_name``, the way RL trainers (OpenRLHF, verl, slime) build the trainer's side of it. The
trainer writes, in plain torch::

    store, _, _ = next(torch.distributed.rendezvous(f"tcp://{addr}:{port}", rank=0, world_size=n))
    group = new_process_group(PrefixStore(group_name, store), ...)   # see ``join_group`` below
    torch.distributed.broadcast(tensor, src=0, group=group)          # per tensor, in order

and each engine worker joins as rank ``rank_offset + its global rank``, receives every tensor into
a buffer of the announced dtype and shape, then loads them all with ``load_checked`` (checked on a
meta-device copy first), so a broadcast of a wrong name or shape changes nothing.
"""

from __future__ import annotations

import inspect
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from treadle.gpu_worker.model_loader import load_checked
from treadle.gpu_worker.models.base import ModelBase
from treadle.runtime.messages import InitWeightsUpdateGroup, UpdateWeightsFromDistributed

JOIN_TIMEOUT = timedelta(minutes=10)  # the trainer must join (and broadcast) within this


def join_group(backend: str, init_method: str, rank: int, world_size: int, group_name: str,
               timeout: timedelta = JOIN_TIMEOUT) -> Any:
    """A process group of its own (not the default one), found through the TCP store at
    ``init_method``; the same steps run on the trainer's side and on every engine worker."""
    store, rank, world_size = next(c10d.rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = c10d.PrefixStore(group_name, store)
    options = "backend_options" if "backend_options" in inspect.signature(c10d._new_process_group_helper).parameters \
        else "pg_options"  # the keyword's name before torch 2.6
    group, _ = c10d._new_process_group_helper(world_size, rank, [], c10d.Backend(backend), store,
                                              group_name=group_name, timeout=timeout, **{options: None})
    c10d._world.pg_group_ranks[group] = {i: i for i in range(world_size)}  # its ranks are its own
    return group


class WeightGroups:
    """The weight-update groups this worker belongs to, by name."""

    def __init__(self, global_rank: int, device: torch.device) -> None:
        self.global_rank = global_rank  # this worker's rank among the engine's workers
        self.device = device
        self.groups: dict[str, Any] = {}
        self.staged: dict[str, list[tuple[str, torch.Tensor]]] = {}  # group -> tensors checked, not yet applied

    def init(self, call: InitWeightsUpdateGroup) -> bool:
        if call.group_name in self.groups:
            raise ValueError(f"weight update group {call.group_name!r} exists already; destroy it first")
        if call.backend == "nccl" and self.device.type != "cuda":
            raise ValueError("backend='nccl' needs the engine on CUDA devices; use backend='gloo' on CPUs")
        rank = call.rank_offset + self.global_rank
        if not 0 < rank < call.world_size:
            raise ValueError(f"worker rank {rank} (rank_offset {call.rank_offset} + {self.global_rank}) is outside "
                             f"world_size {call.world_size} (rank 0 is the trainer's)")
        init = f"tcp://{call.master_address}:{call.master_port}"
        self.groups[call.group_name] = join_group(call.backend, init, rank, call.world_size, call.group_name)
        return True

    def receive(self, call: UpdateWeightsFromDistributed) -> list[tuple[str, torch.Tensor]]:
        """Every tensor the trainer broadcasts, in ``call.names`` order."""
        group = self.group(call.group_name)
        on = self.device if dist.get_backend(group) == "nccl" else torch.device("cpu")
        named = []
        for name, dtype, shape in zip(call.names, call.dtypes, call.shapes):
            t = torch.empty(shape, dtype=getattr(torch, dtype), device=on)
            dist.broadcast(t, src=0, group=group)
            named.append((name, t))
        return named

    def update(self, model: ModelBase, call: UpdateWeightsFromDistributed, model_config: Any, context_len: int
               ) -> bool:
        """``call.phase`` as runtime/messages.WEIGHT_PHASES says: the broadcast is met once, so a
        "check" keeps the received tensors (``staged``) for the "apply" or "drop" that follows."""
        if call.phase == "drop":
            self.staged.pop(call.group_name, None)
            return True
        if call.phase == "apply":
            if call.group_name not in self.staged:
                raise ValueError(f"no checked tensors of group {call.group_name!r} to apply")
            named = self.staged.pop(call.group_name)
        else:
            self.staged.pop(call.group_name, None)
            named = self.receive(call)  # received before any check: the trainer's broadcasts must all be met
        load_checked(model, model_config, context_len, self.device,
                     lambda m: m.load_weights(named, complete=False), call.phase)
        if call.phase == "check":
            self.staged[call.group_name] = named
        return True

    def destroy(self, group_name: str) -> bool:
        dist.destroy_process_group(self.group(group_name))
        del self.groups[group_name]
        self.staged.pop(group_name, None)
        return True

    def group(self, name: str) -> Any:
        if name not in self.groups:
            raise ValueError(f"no weight update group named {name!r}; call init_weights_update_group first")
        return self.groups[name]
