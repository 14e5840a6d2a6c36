"""Weight updates of a running engine (the RL loop's "push the trained weights in") with SGLang's
calls and return shapes: ``update_weights_from_disk``, ``update_weights_from_tensor``,
``get_weights_by_name``.

The work is the scheduler's and the workers' (``UpdateWeightsFrom*``): the scheduler stops
admitting, lets the running requests finish on the old weights, then every worker checks the new
tensors against the model (on a meta-device copy) and copies them in place; the prefix cache is
dropped. Tensors from ``update_weights_from_tensor`` travel in a POSIX shared-memory segment this
side creates and removes; only their names, dtypes, shapes and offsets cross the socket. Here:
argument checks, the segment, and the engine's ``weight_version``, which results report in
``meta_info`` and which changes on the I/O thread the moment the workers answer, so a request
queued during the update reports the new version.
"""

from __future__ import annotations

from multiprocessing import shared_memory
from typing import Any, Callable, Optional

from treadle.client.control import Control
from treadle.runtime.messages import GetWeightsByName, TensorRef, UpdateWeightsFromDisk, UpdateWeightsFromTensor
from treadle.runtime.model_files import resolve_model_files
from treadle.runtime.server_args import ServerArgs


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

    def _bump(self, weight_version: Optional[str]) -> Callable[[], None]:
        """The callback that sets the engine's next ``weight_version`` (given, or the update count)."""
        self.count += 1
        version = weight_version if weight_version is not None else str(self.count)

        def changed() -> None:
            self.server_args.weight_version = version

        return changed

    def by_name(self, name: str, truncate_size: int) -> list:
        """The checkpoint tensor ``name``'s first ``truncate_size`` rows, as float32 lists."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}.")
        if isinstance(truncate_size, bool) or not isinstance(truncate_size, int) or truncate_size < 1:
            raise ValueError(f"truncate_size must be a positive int, got {truncate_size!r}.")
        out = self.control.first(GetWeightsByName(name=name, truncate_size=truncate_size))
        if "error" in out:
            raise (NotImplementedError if out["kind"] == "not_implemented" else ValueError)(out["error"])
        return out["weights"]
