"""The gated MLP activations on a fused [gate | up] projection: SiLU (Llama) and GELU (Gemma)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from treadle.gpu_worker.layers import batch_invariant

try:  # fused kernels for CUDA tensors; without triton (CPU-only installs) every call takes the torch path
    from treadle.gpu_worker.layers import triton_gemma, triton_ops
except ImportError:
    triton_gemma = triton_ops = None


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


class GeluAndMul(nn.Module):
    """GELU-and-mul (GeGLU, Gemma's MLP) on a fused [gate | up] projection; ``approximate="tanh"``
    is transformers' ``gelu_pytorch_tanh``, ``"none"`` the exact GELU."""

    def __init__(self, approximate: str = "tanh"):
        super().__init__()
        if approximate not in ("tanh", "none"):
            raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and self.approximate == "tanh" and triton_gemma is not None:
            return triton_gemma.gelu_tanh_and_mul(x)
        return self.forward_torch(x)

    def forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        """The reference: the CPU path, and what the fused kernel is tested against."""
        if batch_invariant.ENABLED:
            return batch_invariant.gelu_and_mul(x, self.approximate)
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate=self.approximate) * up
