"""SGLang's ``torchao_config`` strings, checked before any process starts (no torch import here).

Each names one ``torchao.quantization.quantize_`` recipe that ``gpu_worker/torchao_quant.py``
applies to the model's linear layers after its weights load. What torchao 0.18 can run depends
on the device: on the CPU ``int8wo`` and ``fp8wo`` run; ``int4wo-<group>`` needs CUDA (its
tinygemm layout) and ``fp8dq-*`` an FP8 GPU (compute capability 8.9+). Asking for one the
machine cannot run is an error here, not a failure in a worker.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

TORCHAO_CONFIGS = ("int8wo", "int4wo-<group>", "fp8wo", "fp8dq-per_tensor", "fp8dq-per_row")
INT4_GROUPS = (32, 64, 128, 256)
CUDA_ONLY = {"int4": "int4wo needs CUDA (torchao's tinygemm int4 layout has no CPU kernel)",
             "fp8dq": "fp8dq needs a GPU with FP8 (compute capability 8.9+, e.g. H100)"}


def parse_torchao_config(value: object) -> Optional[tuple[str, int]]:
    """``(kind, group)`` of a ``torchao_config``: kind one of ``int8wo``, ``int4wo``, ``fp8wo``,
    ``fp8dq-per_tensor``, ``fp8dq-per_row``; group the int4 group size (0 otherwise). None for ""."""
    if value == "" or value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"torchao_config must be a string, got {value!r}.")
    if value in ("int8wo", "fp8wo", "fp8dq-per_tensor", "fp8dq-per_row"):
        return value, 0
    kind, _, group = value.partition("-")
    if kind == "int4wo" and group.isdigit() and int(group) in INT4_GROUPS:
        return kind, int(group)
    raise ValueError(f"torchao_config must be one of {list(TORCHAO_CONFIGS)} (int4 groups {list(INT4_GROUPS)}), "
                     f"got {value!r}.")


BF16_ONLY = ("int4wo", "fp8dq-per_row")  # torchao 0.18's tinygemm layout and its row-wise FP8 take bf16 weights


def check_torchao(value: object, device: str, dtype: str = "auto") -> None:
    """Refuse a ``torchao_config`` that this machine cannot run: torchao missing (ImportError, with
    the extra to install), a recipe the CPU has no kernel for (NotImplementedError) or one that
    needs bfloat16 weights under another ``dtype`` (ValueError)."""
    parsed = parse_torchao_config(value)
    if parsed is None:
        return
    if importlib.util.find_spec("torchao") is None:
        raise ImportError(f"torchao_config={value!r} needs the torchao package: pip install 'treadle[torchao]'.")
    kind = parsed[0].split("-")[0].replace("wo", "")
    if not device.startswith("cuda") and kind in CUDA_ONLY:
        raise NotImplementedError(f"torchao_config={value!r} on device={device!r}: {CUDA_ONLY[kind]}; "
                                  "on the CPU use int8wo or fp8wo.")
    if parsed[0] in BF16_ONLY and dtype not in ("auto", "bfloat16", "bf16"):
        raise ValueError(f"torchao_config={value!r} needs bfloat16 weights, got dtype={dtype!r}.")
