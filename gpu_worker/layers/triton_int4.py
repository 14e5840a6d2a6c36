"""Triton products with 4-bit weights (AWQ / GPTQ, ``quant/int4_linear.py``): ``y = x @ W.T``.

The weight stays packed: ``w [K/8, N]`` int32 (nibble ``i`` of word row ``r`` is input ``8r + i``),
``scales [K/G, N]``, optional ``zeros [K/G, N]`` uint8 (absent: 8), ``W[n, k] = (q - z) * s`` of
group ``k // G``. Both kernels read every packed word once and dequantize it in registers.

- M <= 4 (decode): the split-K GEMV of ``triton_int4_gemv.py``, one launch a layer.
- ``_gemm_kernel`` (M > 4): ``tl.dot`` tiles; the ``[BLOCK_K/8, BLOCK_N]`` words are unpacked to
  ``[BLOCK_K, BLOCK_N]`` in registers, scaled (one scale row per tile where a group spans the
  tile) and cast to the activation dtype. Split-K for M <= 64 (parts summed as in the GEMV),
  grouped tile order for large M.

- From ``DEQUANT_MIN_M`` rows on (long prefills, where the product is bound by compute, not by
  reading the weight), ``_dequant_kernel`` expands column chunks of the weight to the activation
  dtype and cuBLAS multiplies (its GEMMs beat a Triton GEMM that also unpacks where compute
  bounds the product); a chunk of at most ``DEQUANT_CHUNK`` weights keeps the scratch small beside
  a full KV pool and, reused chunk after chunk, in L2.

Shapes and launch settings depend only on (M, N, K), never on data, and outputs are allocated
by torch, so all of it runs inside CUDA graphs.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from treadle.gpu_worker.layers.triton_int4_gemv import GemvLaunch, finish_tile, int4_gemv, outputs, sm_count, split_k

GEMV_MAX_M = 4
# Rows from which dequantize + cuBLAS takes over, and the weights a dequantized chunk holds at most
# (16 MiB in bfloat16: the chunk cuBLAS reads back is still in the H100's 50 MB L2). Guesses until
# measured (bench/kernels/int4_bench.py); the variables let a whole-engine run try others.
DEQUANT_MIN_M = int(os.environ.get("TREADLE_INT4_DEQUANT_MIN_M", "1024"))
DEQUANT_CHUNK = int(os.environ.get("TREADLE_INT4_DEQUANT_CHUNK", str(1 << 23)))


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, stride_xm, stride_om, K_SPLIT,
                 split, G: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PRECISION: tl.constexpr):
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n  # GROUP_M row tiles walk the columns together: weight tiles stay in L2
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = rm < M, rn < N
    shifts = tl.arange(0, 8) * 4
    k_start = pid_k * K_SPLIT
    k_end = tl.minimum(k_start + K_SPLIT, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_mask = kk < k_end
        a = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        kw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        wmask = (kw * 8 < k_end)[:, None] & n_mask[None, :]
        w = tl.load(w_ptr + kw[:, None].to(tl.int64) * N + rn[None, :], mask=wmask, other=0)
        q = (w[:, None, :] >> shifts[None, :, None]) & 0xF  # [BLOCK_K/8, 8, BLOCK_N]: row 8r + i
        q = tl.reshape(q, (BLOCK_K, BLOCK_N)).to(tl.float32)
        if G % BLOCK_K == 0:  # the tile lies in one group (tiles start at multiples of BLOCK_K)
            g = k0 // G
            s = tl.load(s_ptr + g * N + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            if HAS_ZERO:
                z = tl.load(z_ptr + g * N + rn, mask=n_mask, other=0).to(tl.float32)[None, :]
            else:
                z = 8.0
        else:
            g2 = (kk // G)[:, None] * N + rn[None, :]
            smask = k_mask[:, None] & n_mask[None, :]
            s = tl.load(s_ptr + g2, mask=smask, other=0.0).to(tl.float32)
            if HAS_ZERO:
                z = tl.load(z_ptr + g2, mask=smask, other=0).to(tl.float32)
            else:
                z = 8.0
        b = ((q - z) * s).to(a.dtype)
        acc += tl.dot(a, b, input_precision=PRECISION)
    finish_tile(acc, out_ptr, ws_ptr, cnt_ptr, pid, pid_k, split, rm, rn, M, N, stride_om)


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, KW, n0, n_cols, G: tl.constexpr, HAS_ZERO: tl.constexpr,
                    BLOCK_KW: tl.constexpr, BLOCK_N: tl.constexpr):
    """Columns ``[n0, n0 + n_cols)`` of the weight, dequantized, into ``out [K, n_cols]``."""
    r = tl.program_id(0) * BLOCK_KW + tl.arange(0, BLOCK_KW)
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (r < KW)[:, None] & (c < n_cols)[None, :]
    src = r[:, None].to(tl.int64) * N + n0 + c[None, :]
    w = tl.load(w_ptr + src, mask=mask, other=0)
    grp = ((r * 8) // G)[:, None] * N + n0 + c[None, :]
    s = tl.load(s_ptr + grp, mask=mask, other=0.0).to(tl.float32)
    if HAS_ZERO:
        z = tl.load(z_ptr + grp, mask=mask, other=0).to(tl.float32)
    else:
        z = 8.0
    for i in tl.static_range(8):
        q = ((w >> (4 * i)) & 0xF).to(tl.float32)
        dst = (r[:, None].to(tl.int64) * 8 + i) * n_cols + c[None, :]
        tl.store(out_ptr + dst, ((q - z) * s).to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_matmul(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                      group: int) -> torch.Tensor:
    """``x @ W.T`` by cuBLAS on the weight dequantized a column chunk at a time."""
    m, k = x.shape
    n = w.shape[1]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    chunk = max(128, DEQUANT_CHUNK // k // 128 * 128)
    for n0 in range(0, n, chunk):
        cols = min(chunk, n - n0)
        wt = torch.empty((k, cols), dtype=x.dtype, device=x.device)
        _dequant_kernel[(triton.cdiv(k // 8, 16), triton.cdiv(cols, 128))](
            w, scales, scales if zeros is None else zeros, wt, n, k // 8, n0, cols, G=group,
            HAS_ZERO=zeros is not None, BLOCK_KW=16, BLOCK_N=128, num_warps=4)
        if cols == n:
            torch.mm(x, wt, out=out)
        else:
            out[:, n0:n0 + cols] = x @ wt
    return out


def int4_matmul(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                group: int, sms: Optional[int] = None, gemv: Optional[GemvLaunch] = None) -> torch.Tensor:
    """``x [M, K] @ W.T`` -> ``[M, N]`` in ``x``'s dtype (float32 accumulation), W packed as above.
    ``x``'s rows must be dense; ``sms`` overrides the SM count (tests of the split-K paths),
    ``gemv`` the GEMV's tiles (``bench/kernels/int4_bench.py``)."""
    m, k = x.shape
    n = w.shape[1]
    if w.shape[0] * 8 != k or scales.shape != (max(1, k // group), n) or group % 8:
        raise ValueError(f"int4_matmul: x {tuple(x.shape)}, w {tuple(w.shape)}, scales {tuple(scales.shape)}, "
                         f"group {group} do not fit together")
    if x.stride(1) != 1:
        x = x.contiguous()
    sms = sms or (sm_count(x.device) if x.is_cuda else 132)
    z = zeros if zeros is not None else scales  # (unused when HAS_ZERO is False)
    if m >= DEQUANT_MIN_M:
        return dequantize_matmul(x, w, scales, zeros, group)
    if m <= GEMV_MAX_M:
        return int4_gemv(x, w, scales, zeros, group, sms, gemv)
    if m <= 16:
        bm, bn, bk, warps, stages = 16, 64, 128, 4, 4
    elif m <= 32:
        bm, bn, bk, warps, stages = 32, 64, 128, 4, 4
    elif m <= 64:
        bm, bn, bk, warps, stages = 64, 64, 64, 4, 4
    elif m <= 256:
        bm, bn, bk, warps, stages = 64, 128, 64, 4, 3
    else:
        bm, bn, bk, warps, stages = 128, 128, 64, 8, 3
    if 16 <= group < bk and group & (group - 1) == 0:  # a tile inside one group: one scale row per tile
        bk = group
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    split = split_k(tiles, triton.cdiv(k, bk), sms) if m <= 64 else 1
    k_split = triton.cdiv(triton.cdiv(k, split), bk) * bk
    split = triton.cdiv(k, k_split)
    out, ws, cnt = outputs(x, m, n, split)
    _gemm_kernel[(tiles, split)](
        x, w, scales, z, out, ws, cnt, m, n, k, x.stride(0), out.stride(0), k_split, split, G=group,
        HAS_ZERO=zeros is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=warps, num_stages=stages)
    return out
