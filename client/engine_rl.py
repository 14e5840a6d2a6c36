"""The ``Engine`` methods an RL framework drives between rollouts, with SGLang's names and return
shapes: push the trained weights in (from disk, from tensors, or broadcast by the trainer over a
process group), read a weight back, and free the GPU memory while the trainer runs. The work is
``client/weights.py``'s (checks, shared memory) and the scheduler's and workers' beyond it."""

from __future__ import annotations

import asyncio
from typing import Any, Optional

from treadle.client.weights import WeightUpdates


class RLMethods:
    _weights: WeightUpdates

    def update_weights_from_disk(self, model_path: str, load_format: Optional[str] = None,
                                 weight_version: Optional[str] = None) -> tuple[bool, str, int]:
        """A new checkpoint of the served model, in place: ``(success, message, num_paused_requests)``."""
        return self._weights.from_disk(model_path, load_format, weight_version)

    def update_weights_from_tensor(self, named_tensors: list, load_format: Optional[str] = None,
                                   flush_cache: bool = True) -> tuple[bool, str]:
        """``[(checkpoint name, tensor), ...]``, all or part of the model's, in place: ``(success, message)``."""
        return self._weights.from_tensors(named_tensors, load_format, flush_cache)

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str = "weight_update_group", backend: str = "nccl"
                                  ) -> tuple[bool, str]:
        """Join a trainer's process group (its rank 0 hosts the rendezvous at ``master_address:
        master_port``); worker ``r`` of the engine is rank ``rank_offset + r``. Blocks until every
        member has joined, so the trainer joins from another process or thread meanwhile."""
        return self._weights.init_group(master_address, master_port, rank_offset, world_size, group_name, backend)

    def update_weights_from_distributed(self, names: list[str], dtypes: list[Any], shapes: list[list[int]],
                                        group_name: str = "weight_update_group", flush_cache: bool = True,
                                        load_format: Optional[str] = None) -> tuple[bool, str]:
        """Receive the tensors the trainer's rank 0 broadcasts over ``group_name``, in ``names``
        order, as the model's new weights: ``(success, message)``."""
        return self._weights.from_distributed(names, dtypes, shapes, group_name, flush_cache, load_format)

    def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> tuple[bool, str]:
        return self._weights.destroy_group(group_name)

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list:
        """A weight by its checkpoint name: its first ``truncate_size`` rows as lists."""
        return self._weights.by_name(name, truncate_size)

    def release_memory_occupation(self, tags: Optional[list[str]] = None) -> None:
        """Give the device memory of ``tags`` (``"weights"``, ``"kv_cache"``, ``"cuda_graph"``; None:
        all) back, once the running requests have finished. Weights wait in host memory; the
        prefix cache goes with the KV cache. Requests are refused until everything is resumed."""
        self._weights.release_memory(tags)

    def resume_memory_occupation(self, tags: Optional[list[str]] = None) -> None:
        """Take the memory of ``tags`` back (None: all); CUDA graphs are captured again once
        nothing is released."""
        self._weights.resume_memory(tags)

    async def async_update_weights_from_disk(self, model_path: str, load_format: Optional[str] = None,
                                             weight_version: Optional[str] = None) -> tuple[bool, str, int]:
        return await asyncio.to_thread(self.update_weights_from_disk, model_path, load_format, weight_version)

    async def async_update_weights_from_tensor(self, named_tensors: list, load_format: Optional[str] = None,
                                               flush_cache: bool = True) -> tuple[bool, str]:
        return await asyncio.to_thread(self.update_weights_from_tensor, named_tensors, load_format, flush_cache)

    async def async_update_weights_from_distributed(self, names: list[str], dtypes: list[Any],
                                                    shapes: list[list[int]], group_name: str = "weight_update_group",
                                                    flush_cache: bool = True, load_format: Optional[str] = None
                                                    ) -> tuple[bool, str]:
        return await asyncio.to_thread(self.update_weights_from_distributed, names, dtypes, shapes, group_name,
                                       flush_cache, load_format)

    async def async_init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                              world_size: int, group_name: str = "weight_update_group",
                                              backend: str = "nccl") -> tuple[bool, str]:
        return await asyncio.to_thread(self.init_weights_update_group, master_address, master_port, rank_offset,
                                       world_size, group_name, backend)
