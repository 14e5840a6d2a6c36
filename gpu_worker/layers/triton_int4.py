"""Triton products with 4-bit weights (AWQ / GPTQ, ``quant/int4_linear.py``): ``y = x @ W.T``.

The weight stays packed in a K-major layout chosen at load for streaming reads
(``int4_format.pack_kmajor``): ``w [N, K/8]`` int32, one output's words contiguous, in blocks of
4 words (16 bytes, one vector load) holding 32 consecutive inputs, input ``32b + 4i + j`` in
nibble ``i`` of word ``4b + j``; ``scales [N, K/G]``, optional ``zeros [N, K/G]`` uint8 (absent:
8); ``W[n, k] = (q - z) * s`` of group ``k // G``; K a multiple of 32. Every path
reads each packed word once and dequantizes it in registers. ``int4_tiles.choose`` picks, by
(N, K, M), one of:

- ``fma``: the CUDA-core GEMV of ``triton_int4_gemv.py`` (a few rows);
- ``dot``: ``_dot_kernel``, tensor-core tiles. A ``[BLOCK_N, BLOCK_K/8]`` block of words becomes
  ``[BLOCK_N, BLOCK_K]`` codes whose bits are put straight into the activation dtype as
  ``OFF + q * UNIT`` (bfloat16 ``128 + q``, float16 ``1024 + q``, float32 ``1 + q/16``: exact, no
  int-to-float conversion). Where the tile lies in one group, the scale and zero point apply to
  the finished ``[BLOCK_M, BLOCK_N]`` partial product, ``(x . b - (OFF + z UNIT) sum x) s / UNIT``,
  not to each weight; other group sizes dequantize each weight. Split-K for mid M (parts summed
  as in the GEMV), grouped tile order for large M;
- ``dot_wx``: the same tiles computing ``W x^T``: the dequantized weight is the left operand,
  which Hopper's wgmma reads from registers (no trip through shared memory), and a few rows of
  x the right one (its N, as small as 16);
- ``deq``: long prefills, bound by compute: ``_dequant_kernel`` expands row chunks of the weight
  to the activation dtype and cuBLAS multiplies (a chunk of at most ``DEQUANT_CHUNK`` weights
  keeps the scratch small beside a full KV pool and, reused chunk after chunk, in L2).

Shapes and launch settings depend only on (M, N, K), never on data, and outputs are allocated
by torch, so all of it runs inside CUDA graphs.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from treadle.gpu_worker.layers.int4_tiles import FMA_MAX_M, Tile, choose
from treadle.gpu_worker.layers.pdl import allow_dependents, gdc_wait, pdl_launch, pdl_supported
from treadle.gpu_worker.layers.triton_int4_gemv import finish_tile, fma_gemv, outputs, sm_count, splits

# Weights a dequantized chunk holds at most (16 MiB in bfloat16: the chunk cuBLAS reads back is
# still in the H100's 50 MB L2); the variable lets a whole-engine run try others.
DEQUANT_CHUNK = int(os.environ.get("TREADLE_INT4_DEQUANT_CHUNK", str(1 << 23)))
# (OFF, UNIT) of the codes' bits put into each activation dtype
_MAGIC = {torch.bfloat16: (128.0, 1.0), torch.float16: (1024.0, 1.0), torch.float32: (1.0, 0.0625)}
_DT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # _codes' DT


@triton.jit
def unpack(w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Words ``[BLOCK_N, BLOCK_K/8]`` -> codes ``[BLOCK_N, BLOCK_K]`` in input order: nibble ``i``
    of word ``4b + j`` is input ``32b + 4i + j`` (``pack_kmajor``)."""
    shifts = tl.arange(0, 8) * 4
    w4 = tl.reshape(w, (BLOCK_N, BLOCK_K // 32, 4))
    return tl.reshape((w4[:, :, None, :] >> shifts[None, None, :, None]) & 0xF, (BLOCK_N, BLOCK_K))


@triton.jit
def _codes(w, DT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Words ``[BLOCK_N, BLOCK_K/8]`` -> ``OFF + q * UNIT`` ``[BLOCK_N, BLOCK_K]`` in the dtype
    ``DT`` (0 float32, 1 bfloat16, 2 float16), by bits."""
    q = unpack(w, BLOCK_N, BLOCK_K)
    if DT == 1:
        b = (q | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
    elif DT == 2:
        b = (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
    else:
        b = ((q << 19) | 0x3F800000).to(tl.float32, bitcast=True)
    return b


@triton.jit(do_not_specialize=["M", "split"])  # one binary for every batch size
def _dot_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, KW, KG, stride_xm, stride_om, K_SPLIT,
                split, G: tl.constexpr, HAS_ZERO: tl.constexpr, PER_ELEM: tl.constexpr, DT: tl.constexpr,
                OFF: tl.constexpr, UNIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SWAP: tl.constexpr, PRECISION: tl.constexpr,
                PDL: tl.constexpr):
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
    w_rows = w_ptr + rn[:, None].to(tl.int64) * KW
    k_start = pid_k * K_SPLIT
    k_end = tl.minimum(k_start + K_SPLIT, K)
    allow_dependents(PDL)
    if PDL:
        gdc_wait()
    if SWAP:  # the weight the left operand (Hopper's wgmma takes it from registers), x the right
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_mask = kk < k_end
        a = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        kw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        w = tl.load(w_rows + kw[None, :], mask=n_mask[:, None] & (kw * 8 < k_end)[None, :], other=0)
        b = _codes(w, DT, BLOCK_N, BLOCK_K)  # [BLOCK_N, BLOCK_K]
        if PER_ELEM:
            grp = rn[:, None] * KG + (kk // G)[None, :]
            s = tl.load(s_ptr + grp, mask=n_mask[:, None], other=0.0).to(tl.float32)
            if HAS_ZERO:
                z = tl.load(z_ptr + grp, mask=n_mask[:, None], other=0).to(tl.float32)
            else:
                z = 8.0
            wd = (((b.to(tl.float32) - OFF) / UNIT - z) * s).to(a.dtype)
            if SWAP:
                acc += tl.dot(wd, tl.trans(a), input_precision=PRECISION)
            else:
                acc += tl.dot(a, tl.trans(wd), input_precision=PRECISION)
        else:  # the tile lies in one group: scale and zero point on the partial product
            grp = rn * KG + k0 // G
            s = tl.load(s_ptr + grp, mask=n_mask, other=0.0).to(tl.float32) / UNIT
            if HAS_ZERO:
                zc = OFF + tl.load(z_ptr + grp, mask=n_mask, other=0).to(tl.float32) * UNIT
            else:
                zc = s * 0.0 + (OFF + 8.0 * UNIT)
            xs = tl.sum(a.to(tl.float32), axis=1)
            if SWAP:
                d = tl.dot(b, tl.trans(a), input_precision=PRECISION)
                acc += (d - zc[:, None] * xs[None, :]) * s[:, None]
            else:
                d = tl.dot(a, tl.trans(b), input_precision=PRECISION)
                acc += (d - xs[:, None] * zc[None, :]) * s[None, :]
    if SWAP:
        y = tl.trans(acc)
    else:
        y = acc
    finish_tile(y, out_ptr, ws_ptr, cnt_ptr, pid, pid_k, split, rm, rn, M, N, stride_om)


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, K, KW, KG, n0, n_rows, G: tl.constexpr, HAS_ZERO: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
    """Rows ``[n0, n0 + n_rows)`` of the weight, dequantized, into ``out [n_rows, K]``."""
    r = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    kw = tl.program_id(1) * BLOCK_KW + tl.arange(0, BLOCK_KW)
    mask = (r < n_rows)[:, None] & (kw * 8 < K)[None, :]
    w = tl.load(w_ptr + (n0 + r[:, None]).to(tl.int64) * KW + kw[None, :], mask=mask, other=0)
    q = unpack(w, BLOCK_N, BLOCK_KW * 8).to(tl.float32)
    kk = tl.program_id(1) * BLOCK_KW * 8 + tl.arange(0, BLOCK_KW * 8)
    kmask = (r < n_rows)[:, None] & (kk < K)[None, :]
    grp = (n0 + r[:, None]) * KG + (kk // G)[None, :]
    s = tl.load(s_ptr + grp, mask=kmask, other=0.0).to(tl.float32)
    if HAS_ZERO:
        z = tl.load(z_ptr + grp, mask=kmask, other=0).to(tl.float32)
    else:
        z = 8.0
    dst = r[:, None].to(tl.int64) * K + kk[None, :]
    tl.store(out_ptr + dst, ((q - z) * s).to(out_ptr.dtype.element_ty), mask=kmask)


def dequantize_matmul(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                      group: int) -> torch.Tensor:
    """``x @ W.T`` by cuBLAS on the weight dequantized a row chunk at a time."""
    m, k = x.shape
    n = w.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    chunk = max(128, DEQUANT_CHUNK // k // 128 * 128)
    for n0 in range(0, n, chunk):
        rows = min(chunk, n - n0)
        wd = torch.empty((rows, k), dtype=x.dtype, device=x.device)
        _dequant_kernel[(triton.cdiv(rows, 32), triton.cdiv(k // 8, 16))](  # (16 words: 128 inputs)
            w, scales, scales if zeros is None else zeros, wd, k, k // 8, scales.shape[1], n0, rows, G=group,
            HAS_ZERO=zeros is not None, BLOCK_N=32, BLOCK_KW=16, num_warps=4)
        if rows == n:
            torch.mm(x, wd.t(), out=out)
        else:
            out[:, n0:n0 + rows] = x @ wd.t()
    return out


def dot_gemm(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], group: int,
             tile: Tile, sms: int) -> torch.Tensor:
    """``x @ W.T`` on tensor cores with ``tile``'s settings."""
    m, k = x.shape
    n = w.shape[0]
    bm, bn, bk = tile.block_m, tile.block_n, max(32, min(tile.block_k, triton.next_power_of_2(k)))
    if 32 <= group < bk and group & (group - 1) == 0:  # a tile inside one group: scales on the product
        bk = group
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    split = splits(tiles, triton.cdiv(k, bk), sms, tile.split)
    k_split = triton.cdiv(triton.cdiv(k, split), bk) * bk
    split = triton.cdiv(k, k_split)
    out, ws, cnt = outputs(x, m, n, split)
    off, unit = _MAGIC[x.dtype]
    _dot_kernel[(tiles, split)](
        x, w, scales, scales if zeros is None else zeros, out, ws, cnt, m, n, k, k // 8, scales.shape[1], x.stride(0),
        out.stride(0), k_split, split, G=group, HAS_ZERO=zeros is not None,
        PER_ELEM=not (group >= k or group % bk == 0), DT=_DT[x.dtype],
        OFF=off, UNIT=unit, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, SWAP=tile.kind == "dot_wx",
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=tile.warps, num_stages=tile.stages,
        **pdl_launch(x.is_cuda and pdl_supported(x.device) and m <= 16))
    return out


def int4_matmul(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                group: int, sms: Optional[int] = None, tile: Optional[Tile] = None) -> torch.Tensor:
    """``x [M, K] @ W.T`` -> ``[M, N]`` in ``x``'s dtype (float32 accumulation), W packed as above.
    ``sms`` overrides the SM count (tests of the split-K paths), ``tile`` the table's choice
    (``bench/kernels/int4_sweep.py``)."""
    m, k = x.shape
    n = w.shape[0]
    kg = max(1, k // group)
    if w.shape[1] * 8 != k or k % 32 or scales.shape != (n, kg) or group % 8 or (group < k and k % group) or \
            (zeros is not None and zeros.shape != (n, kg)):
        raise ValueError(f"int4_matmul: x {tuple(x.shape)}, w {tuple(w.shape)}, scales {tuple(scales.shape)}, "
                         f"group {group} do not fit together (w [N, K/8], K a multiple of 32, scales [N, K/G])")
    if x.dtype not in _MAGIC:
        raise TypeError(f"int4_matmul: x must be bfloat16, float16 or float32, not {x.dtype}")
    if x.stride(1) != 1:
        x = x.contiguous()
    sms = sms or (sm_count(x.device) if x.is_cuda else 132)
    tile = tile or choose(m, n, k)
    if tile.kind == "deq":
        return dequantize_matmul(x, w, scales, zeros, group)
    if tile.kind == "fma":
        if m > FMA_MAX_M:
            raise ValueError(f"int4_matmul: the CUDA-core GEMV ('fma') takes at most {FMA_MAX_M} rows, not {m}")
        return fma_gemv(x, w, scales, zeros, group, tile, sms)
    return dot_gemm(x, w, scales, zeros, group, tile, sms)  # "dot" and "dot_wx"
