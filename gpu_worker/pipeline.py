"""Pipeline parallelism: which decoder layers a stage owns, and handing activations on.

Stage ``s`` of ``pp_size`` owns a contiguous slice of the decoder layers (``layer_range``); the
token embedding lives only on the first stage, the final norm and the LM head only on the last.
Layers of other stages are ``MissingLayer`` placeholders (no parameters, no KV cache), kept so
that parameter names stay the checkpoint's (``model.layers.N...``) and the loader can skip the
tensors the stage does not own without reading them.

Each step every rank runs the same plan. A non-first stage receives ``(hidden, residual)`` from
the same TP rank of the previous stage instead of embedding tokens; a non-last stage sends its
pair on and has no logits. Sends are asynchronous (one in flight per rank), so a stage can take
its next plan while the next stage still reads; receives match sends in plan order.
"""

from __future__ import annotations

import re
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from treadle.gpu_worker.distributed import global_rank, pp_rank, pp_size

_LAYER = re.compile(r"\.layers\.(\d+)\.")


def layer_range(num_layers: int, rank: int, size: int) -> tuple[int, int]:
    """``[start, end)`` of stage ``rank``'s layers: even shares, the remainder going to the stages
    just before the last (which also carries the LM head), as vLLM's/SGLang's ``get_pp_indices``."""
    if not 1 <= size <= num_layers:
        raise ValueError(f"pp_size {size} must be between 1 and the model's {num_layers} layers")
    if not 0 <= rank < size:
        raise ValueError(f"pp_rank {rank} out of range for pp_size {size}")
    parts = [num_layers // size] * size
    for i in range(2, num_layers % size + 2):
        parts[-i] += 1
    start = sum(parts[:rank])
    return start, start + parts[rank]


def owns_layer_tensor(name: str, start: int, end: int) -> Optional[bool]:
    """For a ``...layers.N...`` name, whether N is in ``[start, end)``; None for other names."""
    m = _LAYER.search(name)
    return None if m is None else start <= int(m.group(1)) < end


class MissingLayer(nn.Module):
    """Stands for a layer another stage owns: no parameters, never called."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("a layer of another pipeline stage was called")


class Stage:
    """This rank's place in the pipeline: receive from the previous stage, run, send to the next."""

    def __init__(self, hidden_size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.rank, self.size = pp_rank(), pp_size()
        self.is_first, self.is_last = self.rank == 0, self.rank == self.size - 1
        self.hidden_size, self.dtype, self.device = hidden_size, dtype, device
        self._sending: Optional[tuple[dist.Work, torch.Tensor]] = None  # keeps the buffer alive

    def forward(self, model: nn.Module, input_ids: torch.Tensor) -> Optional[torch.Tensor]:
        """Final hidden states ``[T, hidden]`` on the last stage; None elsewhere (handed on)."""
        carry = None if self.is_first else self.recv(input_ids.shape[0])
        out = model(input_ids, carry)
        if self.is_last:
            return out
        self.send(*out)
        return None

    def recv(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        buf = torch.empty(2, num_tokens, self.hidden_size, dtype=self.dtype, device=self.device)
        dist.recv(buf, src=global_rank(pp=self.rank - 1))
        return buf[0], buf[1]

    def send(self, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        self.wait_sent()
        buf = torch.stack([hidden, residual])
        self._sending = (dist.isend(buf, dst=global_rank(pp=self.rank + 1)), buf)

    def wait_sent(self) -> None:
        if self._sending is not None:
            self._sending[0].wait()
            self._sending = None
