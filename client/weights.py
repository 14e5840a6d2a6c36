"""Weight updates of a running engine (the RL loop's "push the trained weights in") with SGLang's
calls and return shapes: ``update_weights_from_disk``, ``update_weights_from_tensor``,
``init_weights_update_group`` / ``update_weights_from_distributed`` / ``destroy_weights_update_group``
(a trainer's rank 0 broadcasts into the workers: gpu_worker/weight_group.py), ``get_weights_by_name``,
and ``release_memory_occupation`` / ``resume_memory_occupation`` (gpu_worker/memory_occupation.py).

The work is the scheduler's and the workers' (``UpdateWeightsFrom*``): the scheduler stops
admitting, lets the running requests finish on the old weights, then every worker checks the new
tensors against the model (on a meta-device copy) and copies them in place; the prefix cache is
dropped. Tensors from ``update_weights_from_tensor`` travel in a POSIX shared-memory segment this
side creates and removes; only their names, dtypes, shapes and offsets cross the socket. Here:
argument checks, the segment, and the engine's ``weight_version``, which results report in
``meta_info`` and which changes on the I/O thread the moment the workers answer, so a request
queued during the update reports the new version. With several DP groups the update goes in
steps (client/weight_fanout.py): the version changes once every group has loaded the new weights,
before any of them runs a request again.
"""

from __future__ import annotations

from multiprocessing import shared_memory
from typing import Any, Callable, Optional

from treadle.client.control import Control
from treadle.runtime.errors import EngineDeadError
from treadle.runtime.messages import (
    Call, DestroyWeightsUpdateGroup, GetWeightsByName, InitWeightsUpdateGroup, ReleaseMemoryOccupation,
    ResumeMemoryOccupation, TensorRef, UpdateWeightsFromDisk, UpdateWeightsFromDistributed, UpdateWeightsFromTensor,
)
from treadle.runtime.model_files import resolve_model_files
from treadle.runtime.server_args import ServerArgs, check_int


MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")


def _memory_tags(tags: Optional[list[str]]) -> list[str]:
    if tags is None:
        return list(MEMORY_TAGS)
    if not isinstance(tags, (list, tuple)) or not all(isinstance(t, str) for t in tags):
        raise TypeError(f"tags must be None or a list of strings, got {tags!r}.")
    unknown = [t for t in tags if t not in MEMORY_TAGS]
    if unknown:
        raise ValueError(f"tags: unknown memory tag(s) {unknown}; use {list(MEMORY_TAGS)} (None: all).")
    return list(dict.fromkeys(tags))


def _dtype_name(dtype: Any, i: int) -> str:
    """``torch.bfloat16``, ``"torch.bfloat16"`` or ``"bfloat16"`` -> ``"bfloat16"``."""
    import torch

    name = str(dtype).removeprefix("torch.")
    if not isinstance(dtype, (str, torch.dtype)) or not isinstance(getattr(torch, name, None), torch.dtype):
        raise ValueError(f"dtypes[{i}] must be a torch dtype or its name, got {dtype!r}.")
    return name


class WeightUpdates:
    def __init__(self, control: Control, server_args: ServerArgs) -> None:
        self.control = control
        self.server_args = server_args
        self.count = 0

    def from_disk(self, model_path: str, load_format: Optional[str], weight_version: Optional[str]
                  ) -> tuple[bool, str, int]:
        """``(success, message, num_paused_requests)``; nothing is paused: running requests finish."""
        if not isinstance(model_path, str) or not model_path:
            raise ValueError(f"model_path must be a non-empty string, got {model_path!r}.")
        if load_format not in (None, "auto", "safetensors"):
            raise ValueError(f"load_format must be None, 'auto' or 'safetensors', got {load_format!r}.")
        if weight_version is not None and not isinstance(weight_version, str):
            raise TypeError(f"weight_version must be a string, got {type(weight_version).__name__}.")
        # a GGUF file is converted here, a hub id downloaded (into the engine's download_dir), as at start-up
        files = resolve_model_files(model_path, download_dir=self.server_args.download_dir)
        call = UpdateWeightsFromDisk(model_dir=files.model_dir, load_format=load_format)
        ok, message = self.control.update_weights(call, self._bump(weight_version))
        return ok, message, 0

    def from_tensors(self, named_tensors: Any, load_format: Optional[str], flush_cache: bool) -> tuple[bool, str]:
        """``(success, message)``: named tensors (all or part of the model's, checkpoint names) into
        the weights. Their bytes go into one shared-memory segment the workers read, removed after."""
        import torch

        if load_format not in (None, "direct"):
            raise ValueError(f"load_format must be None or 'direct' (named tensors), got {load_format!r}.")
        if not isinstance(flush_cache, bool):
            raise TypeError(f"flush_cache must be a bool, got {type(flush_cache).__name__}.")
        if not isinstance(named_tensors, (list, tuple)) or not named_tensors:
            raise ValueError("named_tensors must be a non-empty list of (name, torch.Tensor) pairs.")
        tensors = []
        for i, pair in enumerate(named_tensors):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], str)
                    and isinstance(pair[1], torch.Tensor)):
                raise TypeError(f"named_tensors[{i}] must be a (name, torch.Tensor) pair.")
            tensors.append((pair[0], pair[1].detach()))
        refs, offset = [], 0
        for name, t in tensors:
            refs.append(TensorRef(name=name, dtype=str(t.dtype).removeprefix("torch."), shape=list(t.shape),
                                  offset=offset))
            offset += -(-t.numel() * t.element_size() // 64) * 64  # 64-byte aligned starts
        shm = shared_memory.SharedMemory(create=True, size=max(offset, 1))
        try:
            for ref, (_, t) in zip(refs, tensors):
                if t.numel():  # one copy, from any device and layout, straight into the segment
                    torch.frombuffer(shm.buf, dtype=torch.uint8, count=t.numel() * t.element_size(),
                                     offset=ref.offset).view(t.dtype).view(t.shape).copy_(t)
            call = UpdateWeightsFromTensor(shm_name=shm.name, tensors=refs, flush_cache=flush_cache)
            return self.control.update_weights(call, self._bump(None))
        finally:
            shm.close()
            shm.unlink()

    def init_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                   group_name: str, backend: str) -> tuple[bool, str]:
        """Every worker joins the trainer's group as ``rank_offset + its rank``; blocks until the
        trainer's rank 0 has joined too."""
        if not isinstance(master_address, str) or not master_address:
            raise ValueError(f"master_address must be a non-empty string, got {master_address!r}.")
        check_int("master_port", master_port, 1, 65535)
        check_int("rank_offset", rank_offset, 1)
        workers = self.server_args.dp_size * self.server_args.tp_size * self.server_args.pp_size
        check_int("world_size", world_size, rank_offset + workers)
        if not isinstance(group_name, str) or not group_name:
            raise ValueError(f"group_name must be a non-empty string, got {group_name!r}.")
        if backend not in ("nccl", "gloo"):
            raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}.")
        if backend == "nccl" and self.server_args.device != "cuda":
            raise ValueError(f"backend='nccl' needs the engine on CUDA (device={self.server_args.device!r}); "
                             "use backend='gloo'.")
        call = InitWeightsUpdateGroup(master_address=master_address, master_port=master_port, rank_offset=rank_offset,
                                      world_size=world_size, group_name=group_name, backend=backend)
        return self._answered(call, "Succeeded to initialize custom process group.")

    def from_distributed(self, names: list[str], dtypes: list[Any], shapes: list[list[int]], group_name: str,
                         flush_cache: bool, load_format: Optional[str]) -> tuple[bool, str]:
        """Tensors the trainer's rank 0 broadcasts (in ``names`` order) into the weights."""
        if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError("names must be a non-empty list of checkpoint tensor names.")
        if not isinstance(dtypes, (list, tuple)) or not isinstance(shapes, (list, tuple)) \
                or not len(names) == len(dtypes) == len(shapes):
            raise ValueError(f"names, dtypes and shapes must be lists of one length, got {len(names)} names.")
        dtype_names = [_dtype_name(d, i) for i, d in enumerate(dtypes)]
        for i, shape in enumerate(shapes):
            if not isinstance(shape, (list, tuple)) or not all(not isinstance(n, bool) and isinstance(n, int)
                                                               and n >= 0 for n in shape):
                raise ValueError(f"shapes[{i}] must be a list of non-negative ints, got {shape!r}.")
        if not isinstance(flush_cache, bool):
            raise TypeError(f"flush_cache must be a bool, got {type(flush_cache).__name__}.")
        if load_format is not None:
            raise ValueError(f"load_format must be None (tensors are broadcast one by one), got {load_format!r}.")
        call = UpdateWeightsFromDistributed(names=list(names), dtypes=dtype_names, shapes=[list(s) for s in shapes],
                                            group_name=group_name, flush_cache=flush_cache)
        return self.control.update_weights(call, self._bump(None))

    def destroy_group(self, group_name: str) -> tuple[bool, str]:
        return self._answered(DestroyWeightsUpdateGroup(group_name=group_name),
                              f"Succeeded to destroy custom process group {group_name}.")

    def release_memory(self, tags: Optional[list[str]]) -> None:
        """Waits for the running requests, then frees the tagged device memory; requests sent
        until ``resume_memory`` are refused with a ``RuntimeError``."""
        for result in self.control.each(ReleaseMemoryOccupation(tags=_memory_tags(tags))).values():
            if not result["success"]:
                raise RuntimeError(result["message"])

    def resume_memory(self, tags: Optional[list[str]]) -> None:
        self.control.each(ResumeMemoryOccupation(tags=_memory_tags(tags)))

    def _answered(self, call: Call, message: str) -> tuple[bool, str]:
        """``(success, message)`` of a call the workers run: their error becomes ``(False, error)``."""
        try:
            self.control.each(call)
        except EngineDeadError:
            raise
        except RuntimeError as e:
            return False, str(e)
        return True, message

    def _bump(self, weight_version: Optional[str]) -> Callable[[], None]:
        """The callback that sets the engine's next ``weight_version`` (given, or the count of
        updates that succeeded) once the weights changed (every DP group's). The count moves
        there, not when the update is sent: a refused update (a bad name, shape or path) leaves
        the version as it was, and the next one that succeeds takes the next number."""
        version: list[str] = []  # decided at the first call

        def changed() -> None:
            if not version:
                self.count += 1
                version.append(weight_version if weight_version is not None else str(self.count))
            self.server_args.weight_version = version[0]

        return changed

    def by_name(self, name: str, truncate_size: int) -> list:
        """The checkpoint tensor ``name``'s first ``truncate_size`` rows, as float32 lists."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}.")
        check_int("truncate_size", truncate_size, 1)
        out = self.control.first(GetWeightsByName(name=name, truncate_size=truncate_size))
        if "error" in out:
            raise (NotImplementedError if out["kind"] == "not_implemented" else ValueError)(out["error"])
        return out["weights"]
