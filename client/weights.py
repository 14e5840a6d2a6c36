"""Weight updates of a running engine (the RL loop's "push the trained weights in"), SGLang's
calls and return shapes: ``update_weights_from_disk`` so far.

The work is the scheduler's and the workers' (``UpdateWeightsFromDisk``): the scheduler stops
admitting, lets the running requests finish on the old weights, then every worker checks the
whole checkpoint against the model and copies it in place; the prefix cache is dropped. Here:
argument checks, the checkpoint's path, and the engine's ``weight_version``, which results
report in ``meta_info`` and which changes on the I/O thread the moment the workers answer, so a
request queued during the update reports the new version.
"""

from __future__ import annotations

from typing import Optional

from treadle.client.control import Control
from treadle.runtime.messages import GetWeightsByName
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
        files = resolve_model_files(model_path)  # a GGUF file is converted here, as at start-up
        self.count += 1
        version = weight_version if weight_version is not None else str(self.count)

        def changed() -> None:
            self.server_args.weight_version = version

        ok, message = self.control.update_weights_from_disk(files.model_dir, load_format, changed)
        return ok, message, 0

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
