"""A launched step: its sampled ids on their way to the host while the device runs on.

With overlap scheduling the worker queues step N+1 before step N's ids are read, so the ids go to
the host without a stall: an asynchronous copy into a pinned buffer, and an event that says when
it has arrived. ``ModelRunner.finish`` waits for that event only, not for the later queued work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from treadle.gpu_worker.logits_processing import PendingIds
from treadle.runtime.messages import RowOut


@dataclass
class Launched:
    """A step whose device work is queued; ``ModelRunner.finish`` turns it into host results."""

    result: Optional[tuple[list[int], dict[int, RowOut]]] = None  # already final
    uncommitted: Optional[PendingIds] = None  # the sampler's record of the ids; finish commits their values
    ids_host: Optional[torch.Tensor] = None  # sampled ids (pinned host copy on CUDA)
    event: Optional[Any] = None  # torch.cuda.Event recorded after the copy


class HostIdRing:
    """Pinned host buffers (CUDA only) that sampled ids are copied into, each used in turn."""

    def __init__(self, max_rows: int, count: int = 4) -> None:
        self.buffers = [torch.empty(max_rows, dtype=torch.int64, pin_memory=True) for _ in range(count)]
        self.index = 0

    def copy(self, ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Queue the copy of ``ids`` (on the device) to the next buffer: (that buffer's view, an
        event recorded after the copy)."""
        self.index = (self.index + 1) % len(self.buffers)
        host = self.buffers[self.index][: ids.shape[0]]
        host.copy_(ids, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event
