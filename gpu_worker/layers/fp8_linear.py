"""An FP8 linear layer's product: its e4m3 weight and float32 scales, and which kernel runs a batch.

The scales are kept as ``[N, KB]`` with one row per output row, whatever the checkpoint stored:
a per-tensor scale is repeated over the rows and a block scale over the rows of its block. Then
every form is "per row, in groups of ``group`` columns" (per row: one group of all columns), the
tensor-parallel loaders slice scales exactly as they slice the weight's rows (``gpu_worker/fp8.py``),
and a fused layer (q, k and v with a scale each) needs no requantization to one scale. The cost
is 4 bytes a row (per-tensor, per-row) or a row per 128 columns (blocks: 3% of the FP8 weight).

On CUDA (``apply``):
- one token: the Triton GEMV (``triton_fp8.gemv``), reading half of bf16's bytes;
- up to ``SKINNY_MAX`` tokens: the Triton W8A16 GEMM (activations not rounded);
- more tokens with per-row scales: activations quantized per token by one Triton kernel, then
  ``torch._scaled_mm`` (cuBLASLt's FP8 GEMM with row-wise scales);
- more tokens with block scales: activations quantized per token and block of columns, then the
  Triton FP8 x FP8 GEMM that applies both scales per K tile.
Each allocates only its output (CUDA-graph safe: no host synchronization). With
``enable_deterministic_inference`` every batch takes the batch-invariant matmul on the weight
dequantized for the call (slow, but a request's numbers do not depend on its batch). Off CUDA:
the dequantized weight's product (CPU engines dequantize FP8 weights at load, so only tests get
here), or the kernels themselves under Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from treadle.gpu_worker.layers import batch_invariant, triton_fp8

FP8 = torch.float8_e4m3fn
FP8_MAX, MIN_SCALE = triton_fp8.FP8_MAX, triton_fp8.MIN_SCALE
SKINNY_MAX = 16  # decode batches up to this many tokens keep their activations unrounded (W8A16)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter: the kernels' tests


@torch.no_grad()
def quantize_rows(w: torch.Tensor, rows_at_once: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [N, K]`` -> (``q [N, K]`` e4m3, ``scale [N]`` float32), one scale per row mapping its
    absolute maximum to 448; in row chunks so that the float32 temporary stays small."""
    q = torch.empty(w.shape, dtype=FP8, device=w.device)
    s = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for r in range(0, w.shape[0], rows_at_once):
        part = w[r:r + rows_at_once].float()
        s[r:r + rows_at_once] = (part.abs().amax(dim=1) / FP8_MAX).clamp(min=MIN_SCALE)
        q[r:r + rows_at_once] = (part / s[r:r + rows_at_once, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, s


@torch.no_grad()
def quantize_groups(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [N, K]`` -> (``q [N, K]`` e4m3, ``scale [N, ceil(K / group)]`` float32): one scale per row
    and group of ``group`` columns (a block-scaled layer's layout, finer than its checkpoint's blocks
    of rows), each mapping its group's absolute maximum to 448."""
    n, k = w.shape
    kb = -(-k // group)
    wf = F.pad(w.float(), (0, kb * group - k)).view(n, kb, group)
    s = (wf.abs().amax(dim=2) / FP8_MAX).clamp(min=MIN_SCALE)
    q = (wf / s[:, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(n, kb * group)[:, :k].contiguous()
    return q, s


def dequantize(q: torch.Tensor, s: torch.Tensor, group: int) -> torch.Tensor:
    """The float32 weight of ``q [N, K]`` with scales ``s`` (``[N]``, or ``[N, KB]`` in groups of
    ``group`` columns)."""
    s = s.reshape(q.shape[0], -1).float()
    if s.shape[1] > 1:
        s = s.repeat_interleave(group, dim=1)[:, :q.shape[1]]
    return q.float() * s


class Fp8Linear:
    """``layer.quant`` of an FP8 layer (``layers/linear.py`` hands it the product)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, group: int):
        self.weight, self.scale, self.group = weight, scale, group
        self.per_row = scale.dim() == 1
        n, k = weight.shape
        self.scaled_mm = self.per_row and n % 16 == 0 and k % 16 == 0  # cuBLASLt's FP8 shape rule
        self.block_fp8 = not self.per_row and group >= 32  # FP8 tensor-core tiles are 32 columns deep
        self.pdl = False  # the GEMV launched with PDL (fp8.use_pdl, where the model's GEMVs use it)

    @property
    def scales_2d(self) -> torch.Tensor:
        """The kernels' ``[N, KB]`` view, made per call: ``release_memory_occupation`` swaps the
        tensors' storage (``t.data = ...``), which a view kept from load time would not follow."""
        return self.scale.view(-1, 1) if self.per_row else self.scale

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """The layer's product (``layers/linear.py``'s hook; this object is the layer's own)."""
        return self.product(x, bias)

    def product(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        n, k = self.weight.shape
        x2 = x.reshape(-1, k)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        m = x2.shape[0]
        if batch_invariant.ENABLED and m > 0:  # enable_deterministic_inference: the kernels below depend on M
            y = batch_invariant.linear(x2, dequantize(self.weight, self.scale, self.group).to(x.dtype), bias)
        elif m == 0 or not (x.is_cuda or INTERPRETED):
            y = F.linear(x2, dequantize(self.weight, self.scale, self.group).to(x.dtype), bias)
        elif m == 1:
            y = triton_fp8.gemv(x2, self.weight, self.scales_2d, self.group, bias, self.pdl)
        elif self.scaled_mm and m > SKINNY_MAX and x.dtype == torch.bfloat16:
            xq, xs = triton_fp8.quant_rows(x2)
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=xs.view(m, 1), scale_b=self.scale.view(1, n),
                                 out_dtype=x.dtype)
            if bias is not None:
                y = y + bias
        elif self.block_fp8 and m > SKINNY_MAX and x.dtype != torch.float32:  # (float32 models: W8A16)
            xq, xs = triton_fp8.quant_groups(x2, self.group)
            y = triton_fp8.gemm(xq, self.weight, self.scales_2d, self.group, bias, xs, x.dtype)
        else:
            y = triton_fp8.gemm(x2, self.weight, self.scales_2d, self.group, bias)
        return y.reshape(*x.shape[:-1], n)
