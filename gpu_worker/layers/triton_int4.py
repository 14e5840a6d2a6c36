"""Triton products with 4-bit weights (AWQ / GPTQ, ``quant/int4_linear.py``): ``y = x @ W.T``.

The weight stays packed: ``w [K/8, N]`` int32 (nibble ``i`` of word row ``r`` is input ``8r + i``),
``scales [K/G, N]``, optional ``zeros [K/G, N]`` uint8 (absent: 8), ``W[n, k] = (q - z) * s`` of
group ``k // G``. Both kernels read every packed word once and dequantize it in registers.

- ``_gemv_kernel`` (M <= 4, decode): no tensor cores. Program ``(n, s)`` takes ``BLOCK_N``
  outputs and the ``s``-th slice of K (split-K, so a narrow layer still fills the GPU); for each
  of the 8 nibbles it multiplies the nibble plane ``[BLOCK_KW, BLOCK_N]`` by the inputs
  ``8r + i`` and keeps ``sum(q x)`` and ``sum(x)`` apart, applying ``(. - z * .) * s`` once per
  word, not once per weight. Split-K parts meet in a workspace; the last program of a tile to
  finish adds them up (``_finish_tile``), so a layer is one kernel launch.
- ``_gemm_kernel`` (M > 4): ``tl.dot`` tiles; the ``[BLOCK_K/8, BLOCK_N]`` words are unpacked to
  ``[BLOCK_K, BLOCK_N]`` in registers, scaled (one scale row per tile where a group spans the
  tile) and cast to the activation dtype. Split-K for small M, grouped tile order for large M.

- From ``DEQUANT_MIN_M`` rows on (long prefills, where the product is bound by compute, not by
  reading the weight), ``_dequant_kernel`` expands column chunks of the weight to the activation
  dtype and cuBLAS multiplies: its GEMMs beat a Triton GEMM that also unpacks, and a chunk (at
  most ``DEQUANT_CHUNK`` weights) keeps the scratch small beside a full KV pool.

Shapes and launch settings depend only on (M, N, K), never on data, and outputs are allocated
by torch, so all of it runs inside CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

GEMV_MAX_M = 4
DEQUANT_MIN_M = 1024  # rows from which dequantize + cuBLAS takes over (bench/kernels/int4_bench.py)
DEQUANT_CHUNK = 1 << 25  # weights a dequantized chunk holds at most (64 MiB in bfloat16)


@dataclass(frozen=True)
class GemvLaunch:
    """The GEMV's tiles: ``block_n`` outputs x ``block_kw`` word rows (8 inputs each) a step,
    ``warps`` a program, and K split until about ``per_sm`` programs run on each SM."""

    block_n: int = 64
    block_kw: int = 16
    warps: int = 4
    per_sm: int = 4


GEMV = GemvLaunch()


@triton.jit
def _finish_tile(y, out_ptr, ws_ptr, cnt_ptr, tile, pid_k, split, rows, cols, M, N, stride_om):
    """Store a ``[rows, cols]`` tile of partial sums. Split K (``split`` > 1): every split writes
    its part to the workspace ``[split, M, N]``, and the last of them to arrive (a counter per
    tile) adds the parts up, stores the result and resets the counter for the next launch: no
    zero-filled buffer, no atomics on the output, no extra kernels (each costs ~2 us a layer at
    batch 1, also inside a CUDA graph)."""
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    if split == 1:
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        offs = rows[:, None] * N + cols[None, :]
        tl.store(ws_ptr + pid_k * M * N + offs, y, mask=mask)
        tl.debug_barrier()  # every thread's part is written before the counter says so
        if tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel") == split - 1:
            total = tl.zeros(y.shape, dtype=tl.float32)
            for s in range(0, split):
                total += tl.load(ws_ptr + s * M * N + offs, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(cnt_ptr + tile, 0)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, KW, stride_xm, stride_om, KW_SPLIT,
                 split, G: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_KW: tl.constexpr):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    ms = tl.arange(0, BLOCK_M)
    m_mask = ms < M
    kw_start = pid_k * KW_SPLIT
    kw_end = tl.minimum(kw_start + KW_SPLIT, KW)
    acc = tl.zeros((BLOCK_M, BLOCK_KW, BLOCK_N), dtype=tl.float32)
    for kw0 in range(kw_start, kw_end, BLOCK_KW):
        r = kw0 + tl.arange(0, BLOCK_KW)
        r_mask = r < kw_end
        wmask = r_mask[:, None] & col_mask[None, :]
        w = tl.load(w_ptr + r[:, None].to(tl.int64) * N + cols[None, :], mask=wmask, other=0,
                    eviction_policy="evict_first")
        grp = (r * 8) // G
        s = tl.load(s_ptr + grp[:, None] * N + cols[None, :], mask=wmask, other=0.0).to(tl.float32)
        t = tl.zeros((BLOCK_M, BLOCK_KW, BLOCK_N), dtype=tl.float32)
        xs = tl.zeros((BLOCK_M, BLOCK_KW), dtype=tl.float32)
        for i in tl.static_range(8):
            xi = tl.load(x_ptr + ms[:, None] * stride_xm + r[None, :] * 8 + i,
                         mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
            q = ((w >> (4 * i)) & 0xF).to(tl.float32)
            t += xi[:, :, None] * q[None, :, :]
            xs += xi
        if HAS_ZERO:
            z = tl.load(z_ptr + grp[:, None] * N + cols[None, :], mask=wmask, other=0).to(tl.float32)
            acc += (t - xs[:, :, None] * z[None, :, :]) * s[None, :, :]
        else:
            acc += (t - xs[:, :, None] * 8.0) * s[None, :, :]
    _finish_tile(tl.sum(acc, axis=1), out_ptr, ws_ptr, cnt_ptr, pid_n, pid_k, split, ms, cols, M, N, stride_om)


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
    _finish_tile(acc, out_ptr, ws_ptr, cnt_ptr, pid, pid_k, split, rm, rn, M, N, stride_om)


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


_SMS: dict[int, int] = {}
_COUNTERS: dict[torch.device, torch.Tensor] = {}
MAX_TILES = 8192  # split-K counters a device keeps (each launch resets those it used)


def _counters(device: torch.device) -> torch.Tensor:
    if device not in _COUNTERS:
        _COUNTERS[device] = torch.zeros(MAX_TILES, dtype=torch.int32, device=device)
    return _COUNTERS[device]


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def _split(tiles: int, steps: int, sms: int, per_sm: int = 4) -> int:
    """Split K in as many parts as it takes for ``per_sm`` programs an SM, each keeping >= 2 K steps."""
    want = max(1, -(-per_sm * sms // tiles))
    return max(1, min(want, steps // 2))


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
    sms = sms or (_sm_count(x.device) if x.is_cuda else 132)
    z = zeros if zeros is not None else scales  # (unused when HAS_ZERO is False)
    if m >= DEQUANT_MIN_M:
        return dequantize_matmul(x, w, scales, zeros, group)
    if m <= GEMV_MAX_M:
        g = gemv or GEMV
        block_n, block_kw = g.block_n, g.block_kw
        kw = k // 8
        split = _split(triton.cdiv(n, block_n), triton.cdiv(kw, block_kw), sms, g.per_sm) \
            if n <= MAX_TILES * block_n else 1
        kw_split = triton.cdiv(triton.cdiv(kw, split), block_kw) * block_kw
        split = triton.cdiv(kw, kw_split)
        out, ws, cnt = _outputs(x, m, n, split)
        _gemv_kernel[(triton.cdiv(n, block_n), split)](
            x, w, scales, z, out, ws, cnt, m, n, kw, x.stride(0), out.stride(0), kw_split, split, G=group,
            HAS_ZERO=zeros is not None, BLOCK_M=triton.next_power_of_2(m), BLOCK_N=block_n, BLOCK_KW=block_kw,
            num_warps=g.warps)
        return out
    if m <= 16:
        bm, bn, bk, warps, stages = 16, 64, 128, 4, 4
    elif m <= 64:
        bm, bn, bk, warps, stages = 64, 64, 64, 4, 4
    elif m <= 256:
        bm, bn, bk, warps, stages = 64, 128, 64, 4, 3
    else:
        bm, bn, bk, warps, stages = 128, 128, 64, 8, 3
    if 16 <= group < bk and group & (group - 1) == 0:  # a tile inside one group: one scale row per tile
        bk = group
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    split = _split(tiles, triton.cdiv(k, bk), sms) if m <= 64 and tiles <= MAX_TILES else 1
    k_split = triton.cdiv(triton.cdiv(k, split), bk) * bk
    split = triton.cdiv(k, k_split)
    out, ws, cnt = _outputs(x, m, n, split)
    _gemm_kernel[(tiles, split)](
        x, w, scales, z, out, ws, cnt, m, n, k, x.stride(0), out.stride(0), k_split, split, G=group,
        HAS_ZERO=zeros is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=warps, num_stages=stages)
    return out


def _outputs(x: torch.Tensor, m: int, n: int, split: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The output, and with split K the partial sums' workspace and the tile counters."""
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if split == 1:
        return out, out, out  # (unused)
    return out, torch.empty((split, m, n), dtype=torch.float32, device=x.device), _counters(x.device)
