"""Host lists -> device tensors without stalling the host.

A copy from pageable host memory makes CUDA wait for everything queued on the stream before it
starts, so a worker that builds step N+1's index tensors while step N runs would block until
step N ends, undoing overlap scheduling. Copies to CUDA therefore go through pinned memory
(PyTorch's caching host allocator keeps a pinned block alive until its copy is done).
"""

from __future__ import annotations

from typing import Any, Union

import torch


def to_device(values: Any, dtype: torch.dtype, device: Union[torch.device, str]) -> torch.Tensor:
    """``values``: a list (nested lists too) or a CPU tensor."""
    device = torch.device(device)
    if isinstance(values, torch.Tensor):
        host = values.to(dtype)
        return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


ALIGN_BYTES = 16


def to_device_segments(parts: list[list[int]], dtype: torch.dtype, device: Union[torch.device, str]) -> list[torch.Tensor]:
    """Several index lists in one copy, as views that each start on a 16-byte boundary.

    Triton specializes a kernel on whether each pointer argument is 16-byte aligned; views at
    arbitrary offsets of one packed tensor would change that from step to step with the batch's
    composition and compile new kernel variants (about a second each) in the middle of serving.
    """
    per = ALIGN_BYTES // torch.empty(0, dtype=dtype).element_size()
    flat: list[int] = []
    starts = []
    for p in parts:
        starts.append(len(flat))
        flat += p
        flat += [0] * (-len(flat) % per)
    dev = to_device(flat, dtype, device)
    return [dev[s:s + len(p)] for s, p in zip(starts, parts)]
