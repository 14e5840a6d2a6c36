"""``update_weights_from_tensor`` on the worker's side: named tensors read out of the client's
shared-memory segment (no copy until each lands in its parameter, no pickle) and loaded like a
checkpoint's tensors, checked first on a meta-device copy of the model so that a bad update
changes nothing. Host memory carries the bytes on the GPU too (CUDA IPC handles are not built)."""

from __future__ import annotations

import gc
from multiprocessing import resource_tracker, shared_memory
from typing import Any

import torch

from treadle.gpu_worker.model_loader import load_checked
from treadle.gpu_worker.models.base import ModelBase
from treadle.runtime.messages import UpdateWeightsFromTensor


def update_from_shared_memory(model: ModelBase, call: UpdateWeightsFromTensor, model_config: Any,
                              context_len: int, device: torch.device) -> bool:
    """``call.phase`` as runtime/messages.WEIGHT_PHASES says; an "apply" reads the segment again
    (the client keeps it until every DP group has answered)."""
    if call.phase == "drop":
        return True
    shm = shared_memory.SharedMemory(name=call.shm_name)
    # the client owns the segment: this process must not remove it at exit (Python < 3.13 would)
    resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    try:
        _load(model, _views(shm, call), model_config, context_len, device, call.phase)
    finally:
        gc.collect()  # the tensor views must be gone before the mapping closes
        shm.close()
    return True


def _views(shm: shared_memory.SharedMemory, call: UpdateWeightsFromTensor) -> list[tuple[str, torch.Tensor]]:
    named = []
    for ref in call.tensors:
        dtype = getattr(torch, ref.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"update_weights_from_tensor: {ref.name!r} has an unknown dtype {ref.dtype!r}")
        count = 1
        for n in ref.shape:
            count *= n
        named.append((ref.name, torch.frombuffer(shm.buf, dtype=dtype, count=count, offset=ref.offset).view(ref.shape)))
    return named


def _load(model: ModelBase, named: list[tuple[str, torch.Tensor]], model_config: Any, context_len: int,
          device: torch.device, phase: str) -> None:
    if "complete" not in model.load_weights.__code__.co_varnames:
        raise NotImplementedError(f"update_weights_from_tensor is not built for {type(model).__name__}")
    load_checked(model, model_config, context_len, device, lambda m: m.load_weights(named, complete=False), phase)
