"""Prefix-aware extend attention (prefill, chunked prefill, extend after a prefix hit) in Triton.

Rows have several new tokens each, concatenated in ``q``; row r's token i sits at position
``start_r + i`` and sees positions ``[0, start_r + i]`` of its slot: the cached prefix and the
causal part of its own new tokens, whose K/V the backend stored in the cache beforehand, so
every key is read the same way, through ``req_to_token``. The grid is a flat list of
(row, block of BLOCK_M new tokens) work items times query heads, built once per step on the host.

Per-layer options (launch constants, so a CUDA graph captures them): ``window`` W > 0, a query
at position p sees keys ``> p - W`` only (loops start at the block's first visible key);
``logit_cap`` c > 0, scores become ``c * tanh(s / c)`` before the softmax (Gemma 2).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def tanh(x):
    """tanh from exp (the CPU interpreter has no libdevice); saturates to +-1, no overflow."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def scores(q, k, sm_scale, logit_cap, PREC: tl.constexpr, SOFTCAP: tl.constexpr):
    """Scores in log2 units (exp2 instead of exp), soft-capped first with SOFTCAP."""
    if SOFTCAP:
        s = tl.dot(q, k, input_precision=PREC) * sm_scale
        return logit_cap * tanh(s / logit_cap) * 1.4426950408889634
    return tl.dot(q, k, input_precision=PREC) * (sm_scale * 1.4426950408889634)


@triton.jit
def safe_max(m, SLIDING: tl.constexpr):
    """The exponent offset of an online-softmax step: with a window a row may have seen no key
    yet (max -inf); 0 then keeps exp2(-inf - offset) at 0 instead of NaN."""
    if SLIDING:
        return tl.where(m == float("-inf"), 0.0, m)
    return m


@triton.jit(do_not_specialize=["num_rows", "num_items", "window"])  # one compiled kernel for any batch
def _extend_kernel(Q, K, V, O, R2T, Rows, Items, sm_scale, num_rows, num_items,
                   stride_qt, stride_qh, stride_ot, stride_oh, stride_kt, stride_kh,
                   stride_vt, stride_vh, stride_r2t, window, logit_cap,
                   G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
                   SLIDING: tl.constexpr = False, SOFTCAP: tl.constexpr = False, ONE_LOOP: tl.constexpr = False):
    it, h = tl.program_id(0), tl.program_id(1)
    kvh = h // G
    row = tl.load(Items + it)
    mb = tl.load(Items + num_items + it)
    q_start = tl.load(Rows + row)
    start = tl.load(Rows + num_rows + row)
    n = tl.load(Rows + 2 * num_rows + row)
    slot = tl.load(Rows + 3 * num_rows + row).to(tl.int64)

    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m, mask_d = offs_m < n, offs_d < D
    q = tl.load(Q + (q_start + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    q_pos = start + offs_m
    r2t = R2T + slot * stride_r2t
    k_base = K + kvh * stride_kh + offs_d[None, :]
    v_base = V + kvh * stride_vh + offs_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Keys before the block's first query position are seen by every query of the block: no
    # causal mask (with a window: from the block's first visible key, window-masked).
    full_end = (start + mb * BLOCK_M) // BLOCK_N * BLOCK_N
    lo = 0
    if SLIDING:
        lo = tl.maximum(start + mb * BLOCK_M - window + 1, 0) // BLOCK_N * BLOCK_N
    if ONE_LOOP:  # deterministic mode: every key block through the same (masked) code, wherever the row starts;
        full_end = lo  # blocks before ``lo`` (a window's) would leave each query's state at (-inf, 0, 0) exactly
    for s0 in range(lo, full_end, BLOCK_N):
        loc = tl.load(r2t + s0 + offs_n)
        k = tl.trans(tl.load(k_base + loc[:, None] * stride_kt, mask=mask_d[None, :], other=0.0).to(q.dtype))
        s = scores(q, k, sm_scale, logit_cap, PREC, SOFTCAP)
        if SLIDING:
            s = tl.where((s0 + offs_n)[None, :] > q_pos[:, None] - window, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = safe_max(m_new, SLIDING)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        v = tl.load(v_base + loc[:, None] * stride_vt, mask=mask_d[None, :], other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    # The diagonal blocks: causal mask. Key ``full_end`` is visible to every query row (padding
    # rows included), so no row is all -inf and nothing turns NaN (a window: see safe_max).
    end = tl.minimum(start + (mb + 1) * BLOCK_M, start + n)
    for s0 in range(full_end, end, BLOCK_N):
        pos = s0 + offs_n
        mask_n = pos < end
        loc = tl.load(r2t + pos, mask=mask_n, other=0)
        k = tl.trans(tl.load(k_base + loc[:, None] * stride_kt, mask=mask_n[:, None] & mask_d[None, :],
                             other=0.0).to(q.dtype))
        s = scores(q, k, sm_scale, logit_cap, PREC, SOFTCAP)
        visible = (pos[None, :] <= q_pos[:, None]) & mask_n[None, :]
        if SLIDING:
            visible = visible & (pos[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = safe_max(m_new, SLIDING)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        v = tl.load(v_base + loc[:, None] * stride_vt, mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # 0: a padding row that a window left keyless
    tl.store(O + (q_start + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def extend_block_m(max_n: int, dtype: torch.dtype, is_cuda: bool) -> int:
    """Query-block size; the work items of a step depend on it, so the backend picks it first.
    Short extends (speculative / small chunks) get short blocks: they are memory-bound, and a
    64-row block of 8 tokens would read the prefix for 56 rows of padding."""
    if not is_cuda or dtype == torch.float32:
        return 32  # the CPU interpreter and exact fp32 FMA dots: small arrays
    return 16 if max_n <= 16 else 32 if max_n <= 32 else 64


def extend_attention(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, out: torch.Tensor,
                     req_to_token: torch.Tensor, rows: torch.Tensor, items: torch.Tensor,
                     scale: float, block_m: int, window: Optional[int] = None,
                     logit_cap: Optional[float] = None, one_loop: bool = False) -> None:
    """Causal attention of the extend rows' new tokens over their prefix + themselves
    (``window``: the last ``window`` positions only; ``logit_cap``: soft-capped scores).

    ``rows [4, R]`` int32: per row q_start (first token in ``q``), start (cached prefix length),
    n (new tokens), slot. ``items [2, I]`` int32: per work item its row and query block (of
    ``block_m`` tokens). ``q/out [T, H, D]``, ``k_buf/v_buf [num_locs, Hkv, D]``. ``one_loop``: no
    unmasked prefix loop (``triton_deterministic.py``: a key block's code must not depend on the row's start).
    """
    (_, h, d), hkv = q.shape, k_buf.shape[1]
    block_d = max(16, triton.next_power_of_2(d))
    # H100, bf16, D=128: 64x64 tiles, 4 warps, 3 stages beat 128-row tiles on prefixed and batched
    # extends and are within ~6% of the best long-prefill tile (128x128, 8 warps).
    fast = q.is_cuda and q.dtype != torch.float32
    block_n = 32 if not fast or block_d > 128 else 64
    num_warps = 4 if block_d <= 128 else 8
    _extend_kernel[(items.shape[1], h)](
        q, k_buf, v_buf, out, req_to_token, rows, items, scale, rows.shape[1], items.shape[1],
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_buf.stride(0), k_buf.stride(1),
        v_buf.stride(0), v_buf.stride(1), req_to_token.stride(0), window or 0, float(logit_cap or 0.0),
        SLIDING=bool(window), SOFTCAP=bool(logit_cap),
        G=h // hkv, D=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        PREC="ieee" if q.dtype == torch.float32 else "tf32", ONE_LOOP=one_loop, num_warps=num_warps,
        num_stages=3 if block_d <= 128 else 2)
