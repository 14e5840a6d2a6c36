"""A Triton GEMV for one-token decode (``y = x @ W.T + b`` with ``x [1, K]``), launched with PDL.

At batch 1 a decode step is about 130 matrix-vector products in a row, each bounded by reading
its weight once, and each paying a few microseconds to fill the memory pipe and drain it before
the next one may start. Two things make this kernel faster than cuBLAS's in that chain (H100,
``bench/pdl_bench.py``: 32 layers of Llama-3.1-8B's four projections, 4.69 ms against 5.18;
end to end the 8B shape decodes at 181 tok/s against 159):

- Program ``n`` streams ``BLOCK_N`` whole rows and keeps a 2-D float32 accumulator of products,
  reduced across threads once after the K loop (a per-tile reduction cost 10-15%).
- Programmatic dependent launch (``pdl.py``; Hopper and later): the kernel is launched while its
  predecessor still runs, loads its first weight tile and its bias (which no kernel writes while
  the model runs), and only then waits (``gdc_wait``) for the predecessor's output, its input
  ``x``. The kernels before the model's GEMVs let their dependents start first thing
  (``pdl_start``), so the GEMV after them streams its weight while they run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from treadle.gpu_worker.layers import batch_invariant
from treadle.gpu_worker.layers.allreduce_norm import push_words
from treadle.gpu_worker.layers.pdl import allow_dependents, gdc_wait, pdl_launch

if TYPE_CHECKING:
    from treadle.gpu_worker.fused_reduce import PushTarget


@triton.jit
def _load_tile(w_rows, k0, cols, row_mask, K: tl.constexpr, BLOCK_K: tl.constexpr):
    """The ``BLOCK_N x BLOCK_K`` weight tile at column ``k0`` (column masks only where K is not a
    multiple of the tile)."""
    if K % BLOCK_K == 0:
        w = tl.load(w_rows + k0 + cols[None, :], mask=row_mask[:, None], other=0.0, eviction_policy="evict_first")
    else:
        col_mask = k0 + cols < K
        w = tl.load(w_rows + k0 + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0,
                    eviction_policy="evict_first")
    return w


@triton.jit
def _load_x(x_ptr, k0, cols, K: tl.constexpr, BLOCK_K: tl.constexpr):
    if K % BLOCK_K == 0:
        x = tl.load(x_ptr + k0 + cols)
    else:
        x = tl.load(x_ptr + k0 + cols, mask=k0 + cols < K, other=0.0)
    return x.to(tl.float32)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, n, word_ptrs, word_count, slot_elems, K: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, PUSH: tl.constexpr,
                 RANK: tl.constexpr, WORLD: tl.constexpr, PDL: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n
    cols = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rows[:, None].to(tl.int64) * K
    allow_dependents(PDL)
    # the first weight tile and the bias depend on no other kernel: load them before the wait
    w = _load_tile(w_rows, 0, cols, row_mask, K, BLOCK_K)
    if HAS_BIAS:
        bias = tl.load(b_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    if PDL:
        gdc_wait()  # the predecessor's writes (our x) are complete and visible from here on
    acc = w.to(tl.float32) * _load_x(x_ptr, 0, cols, K, BLOCK_K)[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        w = _load_tile(w_rows, k0, cols, row_mask, K, BLOCK_K)
        acc += w.to(tl.float32) * _load_x(x_ptr, k0, cols, K, BLOCK_K)[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += bias
    y = y.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows, y, mask=row_mask)
    if PUSH:  # this rank's partial sums, straight to the peers (allreduce_norm.pulled_rms_norm sums them)
        push_words(y, rows, row_mask, word_ptrs, word_count, slot_elems, RANK, WORLD,
                   out_ptr.dtype.element_ty.primitive_bitwidth == 32)


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int
    pdl: bool  # launch with programmatic dependent launch (pdl.pdl_supported)


def gemv_config(n: int, k: int, pdl: bool) -> GemvConfig:
    """The launch config for a weight ``[n, k]``. On an H100 (``bench/gemv_bench.py``, each call on
    its own weight copy) the best of a grid for every Llama-3.1-8B projection at tp 1 and 2 was
    4 rows a program and 8 warps, with 1,024-wide K tiles for the widest outputs (gate_up, the LM
    head) and 512 elsewhere; 2.5-3.2 TB/s where cuBLAS reads 1.8-2.9."""
    block_k = min(1024 if n >= 16384 else 512, triton.next_power_of_2(k))
    return GemvConfig(4, block_k, 8, pdl)


def takes_gemv(x: torch.Tensor, config: Optional[GemvConfig]) -> bool:
    """Whether ``project`` gives ``x`` to this GEMV: one dense token, a layer with a config."""
    return config is not None and x.dim() == 2 and x.shape[0] == 1 and x.stride(1) == 1


def project(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
            config: Optional[GemvConfig], push: Optional["PushTarget"] = None) -> torch.Tensor:
    """``x W^T + b`` for a layer: one token by this GEMV where the layer has a config
    (``linear.use_triton_gemv``), anything else by cuBLAS. ``push``: the GEMV also sends its
    outputs to the TP peers (only where ``takes_gemv``). With ``enable_deterministic_inference``
    every product takes the batch-invariant matmul (no layer has a GEMV config then)."""
    if batch_invariant.ENABLED:
        return batch_invariant.linear(x, weight, bias)
    if takes_gemv(x, config):
        return gemv(x, weight, config, bias, push)
    return F.linear(x, weight, bias)


def gemv(x: torch.Tensor, w: torch.Tensor, config: GemvConfig, bias: Optional[torch.Tensor] = None,
         push: Optional["PushTarget"] = None) -> torch.Tensor:
    """``x [1, K] @ w[N, K].T (+ bias)`` -> ``[1, N]`` in ``x``'s dtype, float32 accumulation.
    ``w`` must be contiguous and ``x``'s last dimension dense. ``push`` (``fused_reduce.PushTarget``):
    also store the outputs as tagged words into the TP peers' buffers."""
    n, k = w.shape
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    word_ptrs, word_count, slot_elems, rank, world = (w, w, 0, 0, 1) if push is None else push  # (w: unused)
    _gemv_kernel[(triton.cdiv(n, config.block_n),)](
        x, w, w if bias is None else bias, out, n, word_ptrs, word_count, slot_elems, K=k, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, HAS_BIAS=bias is not None, PUSH=push is not None, RANK=rank, WORLD=world,
        num_warps=config.num_warps, **pdl_launch(config.pdl))
    return out
