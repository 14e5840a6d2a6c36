"""Paged decode attention (one new token per row) as split-KV flash-decoding in Triton.

K/V may be stored narrower than the queries (an FP8 cache): they are widened as they load.

Stage 1 gives each (row, KV head, split) program one contiguous chunk of the row's positions
(a row uses at most ``cdiv(len, min_chunk)`` of the launch's splits, so with a large batch only
long rows split, which evens out the programs' work; the unused programs store nothing):
it loads the chunk's KV locations through ``req_to_token``, scores all query heads that share
the KV head at once (GQA: K/V are read once, not once per query head) and writes a partial
output plus its log-sum-exp. Stage 2 merges the splits. A single long row thus still fills the
GPU, and nothing depends on host values: sequence lengths are read on the device and the split
count is a launch constant, so both launches can be captured in a CUDA graph.

A layer's ``window`` W > 0 (sliding-window attention) makes a row's positions
``[max(seq_len - W, 0), seq_len)``: the splits divide that range, so a long row of a windowed
layer costs W positions. ``logit_cap`` > 0 soft-caps the scores (``triton_extend.scores``).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from treadle.gpu_worker.attention.triton_extend import scores
from treadle.gpu_worker.layers.pdl import pdl_launch, pdl_start, pdl_supported

MAX_SPLITS = 32  # the most splits a row gets (the backend's choice is capped here)
WIDE_BLOCK_SMEM = 200 * 1024  # shared memory a block may take for 128-position bf16 blocks (Hopper, Blackwell DC)


@functools.lru_cache(maxsize=None)
def _fits_wide_blocks(device: torch.device) -> bool:
    """Whether 128-position bf16 K/V blocks in three pipeline stages (~192 KB) fit a block's shared memory."""
    return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 0) >= WIDE_BLOCK_SMEM


# The split count and the strides that follow it change with the batch size: as plain runtime
# values (not constexprs, not specialised on == 1) they leave one compiled kernel per model for
# every batch size, so capturing 18 graph sizes compiles each kernel once, not once per size.
_PER_BATCH = ["num_splits", "min_chunk", "stride_lb", "stride_lh", "window"]


@triton.jit
def _window_start(seq_len, window, SLIDING: tl.constexpr):
    """The first position a row's query sees: ``seq_len - window`` with a window, else 0."""
    if SLIDING:
        return tl.maximum(seq_len - window, 0)
    return 0


@triton.jit
def _splits_used(seq_len, num_splits, min_chunk):
    """How many of the launch's splits a row of ``seq_len`` positions uses (stage 1 and 2 agree)."""
    return tl.maximum(tl.minimum(num_splits, tl.cdiv(seq_len, min_chunk)), 1)


@triton.jit(do_not_specialize=_PER_BATCH)
def _decode_stage1(Q, K, V, R2T, QIdx, Slots, SeqLens, MidO, MidLse, sm_scale,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_r2t,
                   stride_mb, stride_mh, stride_ms, stride_lb, stride_lh, num_splits, min_chunk,
                   window, logit_cap,
                   G: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_N: tl.constexpr, PREC: tl.constexpr, F16: tl.constexpr, PDL: tl.constexpr,
                   SLIDING: tl.constexpr = False, SOFTCAP: tl.constexpr = False):
    pdl_start(PDL)
    b, kvh, sp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_len = tl.load(SeqLens + b)
    slot = tl.load(Slots + b).to(tl.int64)
    t = tl.load(QIdx + b)
    # The row's share of the splits, and its chunk rounded up to whole blocks (so the last used
    # splits may still come out empty); programs past the row's share store nothing.
    first = _window_start(seq_len, window, SLIDING)
    used = _splits_used(seq_len - first, num_splits, min_chunk)
    chunk = tl.cdiv(tl.cdiv(seq_len - first, used), BLOCK_N) * BLOCK_N
    lo = first + sp * chunk
    hi = tl.minimum(lo + chunk, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_h, mask_d = offs_h < tl.where(sp < used, G, 0), offs_d < D  # no head of an unused split
    heads = kvh * G + offs_h
    q = tl.load(Q + t * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_h[:, None] & mask_d[None, :], other=0.0)
    if F16:  # an FP8 cache: one instruction widens two FP8 values to float16, bfloat16 takes more
        q = q.to(tl.float16)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        pos = start + offs_n
        mask_n = pos < hi
        loc = tl.load(R2T + slot * stride_r2t + pos, mask=mask_n, other=0)
        k = tl.load(K + loc[None, :] * stride_kt + kvh * stride_kh + offs_d[:, None],
                    mask=mask_n[None, :] & mask_d[:, None], other=0.0).to(q.dtype)  # [BLOCK_D, BLOCK_N]
        s = scores(q, k, sm_scale, logit_cap, PREC, SOFTCAP)  # log2 units: exp2 instead of exp
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        v = tl.load(V + loc[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(q.dtype)  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

    # An empty split stores lse = -inf and a zero output, which stage 2 weighs by exp(-inf) = 0.
    nonempty = l_i > 0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
    tl.store(MidO + b * stride_mb + heads[:, None] * stride_mh + sp * stride_ms + offs_d[None, :], out,
             mask=mask_h[:, None] & mask_d[None, :])
    tl.store(MidLse + b * stride_lb + heads * stride_lh + sp, lse, mask=mask_h)


@triton.jit(do_not_specialize=_PER_BATCH)
def _decode_stage2(MidO, MidLse, O, QIdx, SeqLens, stride_mb, stride_mh, stride_ms, stride_lb, stride_lh,
                   stride_ot, stride_oh, num_splits, min_chunk, window, D: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_S: tl.constexpr, PDL: tl.constexpr, SLIDING: tl.constexpr = False):
    pdl_start(PDL)
    b, h = tl.program_id(0), tl.program_id(1)
    offs_s, offs_d = tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_D)
    seq_len = tl.load(SeqLens + b)
    used = _splits_used(seq_len - _window_start(seq_len, window, SLIDING), num_splits, min_chunk)
    mask_s, mask_d = offs_s < used, offs_d < D
    lse = tl.load(MidLse + b * stride_lb + h * stride_lh + offs_s, mask=mask_s, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))  # split 0 is never empty, so the max is finite
    o = tl.load(MidO + b * stride_mb + h * stride_mh + offs_s[:, None] * stride_ms + offs_d[None, :],
                mask=mask_s[:, None] & mask_d[None, :], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    t = tl.load(QIdx + b)
    tl.store(O + t * stride_ot + h * stride_oh + offs_d, out.to(O.dtype.element_ty), mask=mask_d)


def decode_attention(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, out: torch.Tensor,
                     req_to_token: torch.Tensor, q_idx: torch.Tensor, slots: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float, num_splits: int, min_chunk: int = 64,
                     block_n: Optional[int] = None, num_warps: int = 4, num_stages: int = 3,
                     window: Optional[int] = None, logit_cap: Optional[float] = None) -> None:
    """Write ``out[q_idx[b]]`` = attention of ``q[q_idx[b]]`` over positions ``[0, seq_lens[b])``
    (``window``: the last ``window`` of them; ``logit_cap``: soft-capped scores).

    ``q/out [T, H, D]``, ``k_buf/v_buf [num_locs, Hkv, D]``; ``q_idx/slots/seq_lens [B]`` int
    device tensors. Host values used: only shapes, ``num_splits`` and ``min_chunk`` (the fewest
    positions a split of a row gets, a multiple of 64), so graph capture is safe. ``block_n``
    (positions a loop step), ``num_warps`` and ``num_stages`` of stage 1: the defaults are the
    engine's, the others are for ``bench/decode_attn_bench.py``.

    The default block: 128 positions for an FP8 cache (half the bytes a position), and for a bf16
    cache when the batch fills the GPU by itself (``min_chunk >= 128``, where splits are whole
    512-position chunks) on cards with the shared memory for it: an H100 at CI-workload batches
    reads K/V at 2.80-2.83 TB/s with it against 2.75-2.78 with 64 (``decode_attn_bench.py``; a
    plain read of the same bytes: 2.95-3.03). Small batches keep 64, so short rows still split.
    """
    bs, (_, h, d), hkv = q_idx.shape[0], q.shape, k_buf.shape[1]
    g = h // hkv
    block_d = max(16, triton.next_power_of_2(d))
    block_h = max(16, triton.next_power_of_2(g))  # tl.dot needs M >= 16; the extra rows are masked
    mid_o = torch.empty(bs, h, num_splits, d, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(bs, h, num_splits, dtype=torch.float32, device=q.device)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    pdl = pdl_launch(pdl_supported(q.device))  # both kernels
    # An FP8 cache moves half the bytes a position: twice the positions a block keep as many in flight.
    if block_n is None:
        wide = q.is_cuda and (k_buf.element_size() == 1 or (min_chunk >= 128 and _fits_wide_blocks(q.device)))
        block_n = 128 if wide else 64 if q.is_cuda else 32
    _decode_stage1[(bs, hkv, num_splits)](
        q, k_buf, v_buf, req_to_token, q_idx, slots, seq_lens, mid_o, mid_lse, scale,
        q.stride(0), q.stride(1), k_buf.stride(0), k_buf.stride(1), v_buf.stride(0), v_buf.stride(1),
        req_to_token.stride(0), mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1), num_splits, min_chunk, window or 0, float(logit_cap or 0.0),
        SLIDING=bool(window), SOFTCAP=bool(logit_cap),
        G=g, D=d, BLOCK_H=block_h, BLOCK_D=block_d, BLOCK_N=block_n, PREC=prec,
        F16=q.is_cuda and k_buf.element_size() == 1 and q.dtype == torch.bfloat16,
        num_warps=num_warps, num_stages=num_stages, **pdl)
    _decode_stage2[(bs, h)](
        mid_o, mid_lse, out, q_idx, seq_lens, mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1), out.stride(0), out.stride(1), num_splits, min_chunk, window or 0,
        SLIDING=bool(window), D=d, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(max(num_splits, MAX_SPLITS)),
        num_warps=4 if block_d >= 128 else 2, **pdl)
