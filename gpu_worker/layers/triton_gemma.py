"""Gemma's elementwise layers as one Triton launch each on CUDA: the ``(1 + w)`` RMSNorm (with
the residual add before it) and GELU(tanh)-and-mul. Unfused, each is several torch kernels, which
a batch-1 decode step of 48 layers x 6 norms would pay for in launches.

Numerics follow transformers' Gemma: the residual sum rounds to the activation dtype, the norm's
statistics and the ``1 + w`` gain are float32 and round once at the end; the GELU output rounds to
the activation dtype before it multiplies ``up`` (as ``act(gate) * up`` does in torch).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import triton
import triton.language as tl

from treadle.gpu_worker.layers.pdl import pdl_launch, pdl_start, pdl_supported
from treadle.gpu_worker.layers.triton_ops import _num_warps, _rows

_ACT_BLOCK = 1024


@triton.jit
def _gemma_rms_norm_kernel(x_ptr, x_stride, r_ptr, r_stride, out_ptr, res_out_ptr, w_ptr, n, eps,
                           HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * r_stride + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * n + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / n + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n + cols, xf * rstd * (1.0 + w), mask=mask)


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None
                   ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``GemmaRMSNorm.forward_torch``: ``norm(x)``, or ``(norm(x + residual), x + residual)``."""
    n = x.shape[-1]
    x2 = _rows(x)
    t = x2.shape[0]
    out = torch.empty((t, n), dtype=x.dtype, device=x.device)
    r2 = x2 if residual is None else _rows(residual)
    res_out = out if residual is None else torch.empty((t, n), dtype=x.dtype, device=x.device)
    if t:
        block = triton.next_power_of_2(n)
        _gemma_rms_norm_kernel[(t,)](x2, x2.stride(0), r2, r2.stride(0), out, res_out, weight, n, eps,
                                     HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=_num_warps(block),
                                     **pdl_launch(pdl_supported(x.device)))
    out = out.view(x.shape)
    return out if residual is None else (out, res_out.view(x.shape))


@triton.jit
def _gelu_tanh_and_mul_kernel(x_ptr, x_stride, out_ptr, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + n + cols, mask=mask, other=0.0)
    inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)  # sqrt(2 / pi)
    e = tl.exp(-2.0 * tl.abs(inner))
    th = (1.0 - e) / (1.0 + e)
    th = tl.where(inner < 0, -th, th)
    act = (0.5 * gate * (1.0 + th)).to(up.dtype)  # rounded like F.gelu's output
    tl.store(out_ptr + row * n + cols, act.to(tl.float32) * up.to(tl.float32), mask=mask)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``GeluAndMul("tanh").forward_torch``: ``[..., 2I] -> [..., I]`` as ``gelu_tanh(gate) * up``."""
    n = x.shape[-1] // 2
    x2 = _rows(x)
    t = x2.shape[0]
    out = torch.empty((t, n), dtype=x.dtype, device=x.device)
    if t and n:
        _gelu_tanh_and_mul_kernel[(t, triton.cdiv(n, _ACT_BLOCK))](x2, x2.stride(0), out, n, BLOCK=_ACT_BLOCK,
                                                                   num_warps=4, **pdl_launch(pdl_supported(x.device)))
    return out.view(*x.shape[:-1], n)
