"""Batch-invariant reductions for ``enable_deterministic_inference`` (one switch per worker process).

A reduction's result depends on its order, and a library picks the order from the whole problem's
shape: MKL computes a one-row product as a GEMV and a many-row one as a GEMM (a row of
``F.linear`` differs in its last bits between M=1 and M=2, and between M=2 and M=16), a CUDA
reduction splits a long row across blocks only when there are few rows. So one request's logits
would depend on what else is in its batch. In this mode every reduction of the forward pass that
sums over a request's own data runs with a fixed shape per row:

- ``linear``: on the CPU, rows padded to tiles of ``CPU_TILE`` and one batched GEMM of fixed
  ``[CPU_TILE, K] x [K, N]`` items (a row's values do not depend on the other rows of its tile or
  its place in it; tests/unit/test_batch_invariant.py checks that of the installed MKL); on CUDA
  a Triton matmul with one tile config and no split-K (``triton_batch_invariant.py``).
- ``logsumexp`` / ``softmax``: per row, in fixed 64-wide pieces then a fixed-length sum (CPU), or
  one Triton program per row (CUDA).
- ``silu_and_mul`` (CPU): ``x / (1 + exp(-x))``, because torch's ``silu`` takes a vector and a
  scalar path for different elements of one tensor (they differ in the last bit), and which
  elements are the scalar tail depends on the tensor's size; ``exp`` runs one vector path for all.
  ``gelu_and_mul`` likewise writes GELU with ``tanh`` / ``erf`` (one path each) for ``F.gelu``.

Attention has its own backends (``attention/torch_deterministic.py``, ``triton_deterministic.py``).
Off (the default) nothing here runs: the callers test ``ENABLED`` once per call.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

ENABLED = False
CPU_TILE = 32  # rows per CPU GEMM item (one thread, SmolLM2-135M layers: 4.4x plain at 1 row, 1.3x at 64, 1.6x at 512)
MIN_N = 8  # output columns a CPU product is padded to (fewer take an MKL path whose rows depend on the batch)
_PIECE = 64  # CPU row reductions: sums of 64 elements, then one sum over the pieces


def enable(on: bool = True) -> None:
    """Switch the mode for this process (the worker calls it once, before building the model)."""
    global ENABLED
    ENABLED = on


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x W^T + b`` whose every row is the same whatever the other rows of ``x`` are."""
    if x.is_cuda:
        from treadle.gpu_worker.layers.triton_batch_invariant import matmul
        return matmul(x, weight, bias)
    n = weight.shape[0]
    if n < MIN_N:  # a one-column product (a shared expert's gate) is a GEMV to MKL, batched differently by count
        weight = F.pad(weight, (0, 0, 0, MIN_N - n))
        bias = None if bias is None else F.pad(bias, (0, MIN_N - n))
        return linear(x, weight, bias)[..., :n]
    shape, k = x.shape, x.shape[-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    tiles = -(-m // CPU_TILE)
    xp = x2.new_zeros(max(tiles, 1) * CPU_TILE, k)
    xp[:m] = x2
    y = torch.bmm(xp.view(-1, CPU_TILE, k), weight.t().expand(xp.shape[0] // CPU_TILE, k, weight.shape[0]))
    y = y.view(-1, weight.shape[0])[:m]
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], weight.shape[0])


def _row_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of each row of a 2-D CPU tensor in a fixed order: 64-element pieces, then the pieces
    (each reduction far below torch's parallel grain, so never split differently)."""
    n = x.shape[1]
    pad = -n % _PIECE
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(x.shape[0], -1, _PIECE).sum(-1).sum(-1)


def logsumexp(x: torch.Tensor) -> torch.Tensor:
    """``x.logsumexp(-1)`` of a 2-D float32 tensor, each row reduced the same way in any batch."""
    if x.is_cuda:
        from treadle.gpu_worker.layers.triton_batch_invariant import row_logsumexp
        return row_logsumexp(x)
    m = x.amax(-1, keepdim=True)  # max is exact in any order
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return _row_sum(torch.exp(x - m)).log() + m[:, 0]


def softmax(x: torch.Tensor) -> torch.Tensor:
    """``x.softmax(-1)`` of a 2-D float32 tensor, batch-invariant per row."""
    return torch.exp(x - logsumexp(x)[:, None])


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """CPU ``silu(gate) * up`` of ``x = [gate | up]`` with every element on one code path."""
    gate, up = x.chunk(2, dim=-1)
    return gate / (1.0 + torch.exp(-gate)) * up


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    """CPU ``sigmoid`` with every element on one code path (torch's, like ``silu``, has a size-dependent tail)."""
    return 1.0 / (1.0 + torch.exp(-x))


def gelu_and_mul(x: torch.Tensor, approximate: str) -> torch.Tensor:
    """CPU ``gelu(gate) * up`` (``approximate`` "tanh" or "none") with every element on one code path."""
    gate, up = x.chunk(2, dim=-1)
    if approximate == "tanh":
        inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)  # sqrt(2 / pi)
        return 0.5 * gate * (1.0 + torch.tanh(inner)) * up
    return 0.5 * gate * (1.0 + torch.erf(gate * 0.7071067811865476)) * up
