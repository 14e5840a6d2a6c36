"""RMSNorm, optionally fused with the residual add that precedes it in every decoder block."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from treadle.gpu_worker.distributed import all_reduce
from treadle.gpu_worker.fused_reduce import fused_all_reduce_rms_norm

try:  # fused kernels for CUDA tensors; without triton (CPU-only installs) every call takes the torch path
    from treadle.gpu_worker.layers import triton_gemma, triton_ops
except ImportError:
    triton_gemma = triton_ops = None


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in float32, then back to the model dtype before the gain (exactly as HF).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None, reduce: bool = False
                ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``norm(x)``, or with ``residual``: ``(norm(x + residual), x + residual)``.

        ``reduce``: ``x`` is this TP rank's partial sum (a row-parallel layer that left its
        all-reduce to the norm); it is summed over the ranks first, in one kernel with the add and
        the norm where ``fused_reduce.fused_all_reduce_rms_norm`` can."""
        if reduce:
            fused = fused_all_reduce_rms_norm(x, residual, self.weight, self.eps)
            if fused is not None:
                return fused
            x = all_reduce(x)
        if x.is_cuda and triton_ops is not None:
            return triton_ops.rms_norm(x, self.weight, self.eps, residual)
        return self.forward_torch(x, residual)

    def forward_torch(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
                      ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The reference: the CPU path, and what the fused kernel is tested against."""
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: the gain is ``1 + w`` and it multiplies the float32 statistics before the
    cast back (Llama casts first), exactly as transformers' Gemma2/Gemma3 RMSNorm. CUDA tensors:
    one kernel with the residual add (``triton_gemma.py``)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__(hidden_size, eps)
        self.weight.data.zero_()  # ``1 + 0``: the identity gain, as HF initializes it

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None, reduce: bool = False
                ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if reduce:
            x = all_reduce(x)
        if x.is_cuda and triton_gemma is not None:
            return triton_gemma.gemma_rms_norm(x, self.weight, self.eps, residual)
        return self.forward_torch(x, residual)
