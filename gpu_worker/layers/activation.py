"""SiLU-and-mul: the gated MLP activation on a fused [gate | up] projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from treadle.gpu_worker.layers import batch_invariant

try:  # fused kernel for CUDA tensors; without triton (CPU-only installs) every call takes the torch path
    from treadle.gpu_worker.layers import triton_ops
except ImportError:
    triton_ops = None


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and triton_ops is not None:
            return triton_ops.silu_and_mul(x)
        return self.forward_torch(x)

    def forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        """The reference: the CPU path, and what the fused kernel is tested against."""
        if batch_invariant.ENABLED:
            return batch_invariant.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
