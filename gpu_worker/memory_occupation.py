"""``release_memory_occupation`` / ``resume_memory_occupation`` on the worker's side: an RL loop
frees the engine's device memory while its trainer runs on the same GPUs, then takes it back.

- ``weights``: every parameter and buffer of the model is copied to host memory (pinned) and its
  device storage dropped; resume copies it back. On a CPU engine the tensors are only set aside
  (device memory is host memory there: nothing to give back). The weights survive the cycle, so a
  resumed engine serves exactly what it served before (an update may replace them afterwards).
- ``kv_cache``: the KV pool's storage is dropped (the scheduler empties the prefix cache with it);
  resume allocates a zeroed pool of the same size.
- ``cuda_graph``: the captured decode graphs and their memory pool.

Resumed tensors land at new addresses, and CUDA graphs hold the old ones, so any release drops
the graphs and the resume that makes the engine whole again captures them afresh (a re-capture
costs what start-up's did; ``graph_capture_time`` reports it). Freed memory goes back to the
driver (``empty_cache``): ``torch.cuda.mem_get_info`` sees it, not only PyTorch's allocator.
"""

from __future__ import annotations

import gc
import logging
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from treadle.gpu_worker.model_runner import ModelRunner

TAGS = ("weights", "kv_cache", "cuda_graph")
logger = logging.getLogger("treadle.worker")


class MemoryOccupation:
    def __init__(self, runner: "ModelRunner") -> None:
        self.runner = runner
        self.released: set[str] = set()
        # model tensor name -> its host copy; on a GPU the pinned buffers stay for the next cycle (RL loops
        # release every step), so the host holds a copy of the weights from the first release on
        self.host_weights: dict[str, torch.Tensor] = {}
        self.kv_shape: tuple[int, ...] = ()
        self.graphs_wanted = runner.graphs is not None

    def release(self, tags: list[str]) -> dict[str, int]:
        """Free ``tags``' device memory; returns the bytes given back to the driver (CUDA)."""
        r = self.runner
        free_before = _free_bytes(r.device)
        r.graphs = None  # they point at the memory about to go; captured again by the resume that ends it
        if "cuda_graph" in tags:
            self.released.add("cuda_graph")
        if "weights" in tags and "weights" not in self.released:
            on_host = r.device.type == "cpu"  # the device memory is host memory: keep the tensors as they are
            kept = [(name, t) for name, t in _model_tensors(r.model) if t.numel()]
            for name, t in kept:
                if on_host:
                    self.host_weights[name] = t.data
                    continue
                host = self.host_weights.get(name)  # kept from the last cycle: pinning 16 GB anew costs seconds
                if host is None or host.shape != t.shape or host.dtype != t.dtype:
                    host = self.host_weights[name] = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
                host.copy_(t, non_blocking=True)
            if not on_host:
                torch.cuda.synchronize(r.device)
            for _, t in kept:
                t.data = torch.empty(0, dtype=t.dtype, device=t.device)
            self.released.add("weights")
        if "kv_cache" in tags and "kv_cache" not in self.released and r.kv_cache is not None:
            self.kv_shape = tuple(r.kv_cache.buf.shape)
            r.kv_cache.buf = torch.empty(0, dtype=r.kv_cache.buf.dtype, device=r.device)
            self.released.add("kv_cache")
        gc.collect()
        if r.device.type == "cuda":
            torch.cuda.empty_cache()
        return {"freed_bytes": _free_bytes(r.device) - free_before}

    def resume(self, tags: list[str]) -> dict[str, float]:
        """Take ``tags``' memory back; once nothing is released, the CUDA graphs are captured again."""
        r = self.runner
        if "weights" in tags and "weights" in self.released:
            for name, t in _model_tensors(r.model):
                if name in self.host_weights:
                    t.data = self.host_weights[name].to(r.device, non_blocking=True)
            self.released.discard("weights")
        if "kv_cache" in tags and "kv_cache" in self.released:
            r.kv_cache.buf = torch.zeros(self.kv_shape, dtype=r.kv_cache.buf.dtype, device=r.device)
            self.released.discard("kv_cache")
        if "cuda_graph" in tags:
            self.released.discard("cuda_graph")
        seconds = 0.0
        if not self.released and self.graphs_wanted and r.graphs is None:
            r.capture_graphs()
            seconds = r.graph_capture_time
            logger.info("CUDA graphs captured again after resume in %.1f s", seconds)
        if r.device.type == "cuda":
            torch.cuda.synchronize(r.device)
        return {"graph_capture_seconds": seconds}


def _model_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters and buffers, each shared one once (a tied LM head is the embedding's tensor)."""
    seen, out = set(), []
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            out.append((name, t))
    return out


def _free_bytes(device: torch.device) -> int:
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
