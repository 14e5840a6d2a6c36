"""Triton kernels for FP8 (e4m3) weights: per-token activation quantization, a GEMV for one token
and a GEMM that dequantizes the weight tile in registers.

A weight is ``w [N, K]`` float8_e4m3fn with float32 scales ``s [N, KB]``: column ``k`` of row ``n``
is ``w[n, k] * s[n, k // G]``. Per-row (and per-tensor, expanded to rows) scales are ``KB = 1,
G = K``: the scale is applied once to the finished dot product. Block scales (128x128 in the
DeepSeek/Qwen3 releases) are kept expanded along rows (``layers/fp8_linear.py`` says why), so a
program needs one scale vector per K tile, and ``G`` is a power of two the K tile divides.

- ``quant_rows``: ``x [M, K]`` -> ``(q [M, K] fp8, scale [M] float32)``, one program a row, the
  row's absolute maximum mapped to 448 (e4m3's largest finite value); what ``torch._scaled_mm``
  takes for the large-batch path.
- ``quant_groups``: the same per token and per ``G`` columns, for block-scaled products.
- ``gemv``: ``x [1, K]``, the batch-1 decode product. Bound by reading the weight, which is half
  of bf16's bytes; each program streams ``BLOCK_N`` whole rows into a 2-D float32 accumulator
  (as ``triton_gemv.py``) and reduces across threads once; with PDL (``pdl.py``) its first
  weight tile is loaded before it waits for its predecessor.
- ``gemm``: ``x [M, K]`` in the model's dtype against the weight converted tile by tile to that
  dtype (W8A16: small decode batches keep their activations unrounded), or, for block-scaled
  weights and larger batches, ``x`` from ``quant_groups``: FP8 x FP8 tensor-core products, each
  K tile scaled by its activation and weight group scales (the DeepSeek-V3 recipe).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from treadle.gpu_worker.layers.pdl import allow_dependents, gdc_wait, pdl_launch

FP8_MAX = 448.0
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)  # an all-zero row still gets a finite scale (as vLLM)


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, BLOCK_K: tl.constexpr, MIN_S: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + row * stride_x + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0) / 448.0, MIN_S)
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):
        mask = k0 + cols < K
        x = tl.load(x_ptr + row * stride_x + k0 + cols, mask=mask, other=0.0).to(tl.float32)
        q = tl.clamp(x / scale, -448.0, 448.0)
        tl.store(q_ptr + row * K + k0 + cols, q.to(q_ptr.dtype.element_ty), mask=mask)


def quant_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token dynamic quantization of ``x [M, K]`` (last dimension dense): fp8 ``[M, K]`` and
    float32 scales ``[M]`` with ``x ~ q * scale[:, None]``."""
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m:
        _quant_rows_kernel[(m,)](x, q, s, k, x.stride(0), BLOCK_K=min(1024, triton.next_power_of_2(k)),
                                 MIN_S=MIN_SCALE, num_warps=4)
    return q, s


@triton.jit
def _quant_groups_kernel(x_ptr, q_ptr, s_ptr, K, KB, stride_x, G: tl.constexpr, MIN_S: tl.constexpr):
    row, g = tl.program_id(0).to(tl.int64), tl.program_id(1)
    cols = g * G + tl.arange(0, G)
    mask = cols < K
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0) / 448.0, MIN_S)
    tl.store(s_ptr + row * KB + g, scale)
    tl.store(q_ptr + row * K + cols, tl.clamp(x / scale, -448.0, 448.0).to(q_ptr.dtype.element_ty), mask=mask)


def quant_groups(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token, per-``group``-columns dynamic quantization of ``x [M, K]`` (the activations of a
    block-scaled product): fp8 ``[M, K]`` and float32 scales ``[M, ceil(K / group)]``."""
    m, k = x.shape
    kb = triton.cdiv(k, group)
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((m, kb), dtype=torch.float32, device=x.device)
    if m:
        _quant_groups_kernel[(m, kb)](x, q, s, k, kb, x.stride(0), G=group, MIN_S=MIN_SCALE, num_warps=4)
    return q, s


@triton.jit
def _gemv_load(w_rows, x_ptr, row_mask, cols, k0, K: tl.constexpr, EVEN_K: tl.constexpr):
    """A weight tile and its slice of x, as float32; column masks only where K is not a multiple of
    the tile (so the loads stay vectorized, as in ``triton_gemv.py``)."""
    if EVEN_K:
        w = tl.load(w_rows + k0 + cols[None, :], mask=row_mask[:, None], other=0.0, eviction_policy="evict_first")
        x = tl.load(x_ptr + k0 + cols)
    else:
        col_mask = k0 + cols < K
        w = tl.load(w_rows + k0 + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0,
                    eviction_policy="evict_first")
        x = tl.load(x_ptr + k0 + cols, mask=col_mask, other=0.0)
    return w.to(tl.float32), x.to(tl.float32)


@triton.jit
def _gemv_tile(acc, w_rows, x_ptr, s_ptr, rows, row_mask, cols, k0, K: tl.constexpr, KB: tl.constexpr,
               G: tl.constexpr, PER_ROW: tl.constexpr, EVEN_K: tl.constexpr):
    w, x = _gemv_load(w_rows, x_ptr, row_mask, cols, k0, K, EVEN_K)
    if PER_ROW:
        acc += w * x[None, :]
    else:  # the tile lies inside one scale group (G is a multiple of BLOCK_K)
        acc += w * x[None, :] * tl.load(s_ptr + rows * KB + k0 // G, mask=row_mask, other=0.0)[:, None]
    return acc


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, N, K: tl.constexpr, KB: tl.constexpr, G: tl.constexpr,
                 PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr, PDL: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    cols = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rows[:, None].to(tl.int64) * K
    allow_dependents(PDL)
    # the first weight tile depends on no other kernel: in flight before the wait for x (pdl.py)
    if EVEN_K:
        w0 = tl.load(w_rows + cols[None, :], mask=row_mask[:, None], other=0.0, eviction_policy="evict_first")
    else:
        w0 = tl.load(w_rows + cols[None, :], mask=row_mask[:, None] & (cols < K)[None, :], other=0.0,
                     eviction_policy="evict_first")
    w0 = w0.to(tl.float32)
    if PDL:
        gdc_wait()
    x0 = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
    if PER_ROW:
        acc = w0 * x0[None, :]
    else:
        acc = w0 * x0[None, :] * tl.load(s_ptr + rows * KB, mask=row_mask, other=0.0)[:, None]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        acc = _gemv_tile(acc, w_rows, x_ptr, s_ptr, rows, row_mask, cols, k0, K, KB, G, PER_ROW, EVEN_K)
    y = tl.sum(acc, axis=1)
    if PER_ROW:
        y *= tl.load(s_ptr + rows, mask=row_mask, other=0.0)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_mask)


def _k_tile(k: int, group: int, most: int) -> int:
    """The K tile: a power of two that divides the scale group (per-row scales: any)."""
    tile = min(most, triton.next_power_of_2(k))
    return tile if group >= k else min(tile, group)


GEMV_TILE = (8, 512, 8)  # rows a program, K tile, warps: the bf16 GEMV's 4 KB a tile, for shapes not below
# (N, K) -> GEMV_TILE's fields for that weight: paste the dict that
# ``python bench/kernels/int4_sweep.py --fp8`` prints here (H100, Llama-3.1-8B's projections)
GEMV_TILES: dict[tuple[int, int], tuple[int, int, int]] = {}


def gemv_tile(n: int, k: int) -> tuple[int, int, int]:
    """The GEMV's tile for an ``[N, K]`` weight: the measured one, else ``GEMV_TILE``."""
    return GEMV_TILES.get((n, k), GEMV_TILE)


def gemv(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, group: int, bias: Optional[torch.Tensor] = None,
         pdl: bool = False, tile: Optional[tuple[int, int, int]] = None) -> torch.Tensor:
    """``x [1, K] @ (w * s).T (+ bias)`` -> ``[1, N]`` in ``x``'s dtype, float32 accumulation;
    launched with programmatic dependent launch if ``pdl`` (``pdl.pdl_supported``). ``tile``:
    (rows a program, K tile, warps), ``gemv_tile``'s by default (``bench/kernels/int4_sweep.py --fp8``)."""
    n, k = w.shape
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    per_row = group >= k
    block_n, block_k, warps = tile or gemv_tile(n, k)
    block_k = _k_tile(k, group, block_k)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, w, s, w if bias is None else bias, out, n, K=k, KB=s.shape[1], G=group, PER_ROW=per_row,
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0, num_warps=warps,
        **pdl_launch(pdl))
    return out


@triton.jit
def _gemm_kernel(x_ptr, xs_ptr, w_ptr, s_ptr, b_ptr, out_ptr, M, N, K, stride_x, KB, G: tl.constexpr,
                 PER_ROW: tl.constexpr, X_FP8: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask, n_mask = offs_m < M, offs_n < N
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_x
    w_cols = w_ptr + offs_n[None, :].to(tl.int64) * K
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = k0 + offs_k < K
        a = tl.load(x_rows + k0 + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w_cols + k0 + offs_k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if not X_FP8:
            b = b.to(a.dtype)
        if IEEE:
            d = tl.dot(a, b, input_precision="ieee")
        else:
            d = tl.dot(a, b)
        if X_FP8:  # both operands FP8 in groups of G columns: both scales of this group
            d *= tl.load(xs_ptr + offs_m * KB + k0 // G, mask=m_mask, other=0.0)[:, None]
        if PER_ROW:
            acc += d
        else:
            acc += d * tl.load(s_ptr + offs_n * KB + k0 // G, mask=n_mask, other=0.0)[None, :]
    if PER_ROW:
        acc *= tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def gemm(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, group: int, bias: Optional[torch.Tensor] = None,
         x_scales: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``x [M, K] @ (w * s).T (+ bias)`` -> ``[M, N]`` in ``x``'s dtype (last dimension of ``x`` dense).
    With ``x_scales`` ``[M, KB]``, ``x`` is FP8 from ``quant_groups(x, group)`` (block scales only):
    an FP8 x FP8 product, the result in ``out_dtype``."""
    m, k = x.shape
    n = w.shape[0]
    out = torch.empty((m, n), dtype=out_dtype or x.dtype, device=x.device)
    per_row = group >= k
    block_m = min(64, max(16, triton.next_power_of_2(m)))
    block_n = 64 if m <= 16 else 128
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _gemm_kernel[grid](x, s if x_scales is None else x_scales, w, s, w if bias is None else bias, out, m, n, k,
                       x.stride(0), s.shape[1], G=group, PER_ROW=per_row, X_FP8=x_scales is not None,
                       HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
                       BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=_k_tile(k, group, 128),
                       num_warps=4, num_stages=3)
    return out
