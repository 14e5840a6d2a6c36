"""The fused MoE for a few token-expert pairs (decode): one GEMV per pair, no alignment.

At batch 1 with top-8 the tiled kernels of ``triton_moe.py`` fill 1 row of each 16-row block and
need the alignment launch first; here each pair's expert rows are read once by plain GEMVs:

1. ``_gate_up_kernel``: program ``(pair, column block)``: ``silu(x W_gate^T) * (x W_up^T)``.
2. ``_down_sum_kernel``: program ``(token, column block)``: ``sum_j weight_j * (h_j W_down_j^T)``
   over the token's ``k`` pairs, in float32: the down projection, the routing weight and the sum
   in one launch, straight into the output.

Two launches after routing, grids fixed by ``T``, ``k`` and the widths: CUDA-graph safe. Pairs
whose expert is outside ``[0, E)`` (another expert-parallel rank's) are skipped. Tokens sharing an
expert read its rows once each (the second mostly from L2), which is why ``triton_moe`` takes
this path only up to ``GEMV_MAX_PAIRS`` pairs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

GATE_UP_BLOCKS = (16, 256)  # (BLOCK_N, BLOCK_K): untuned (bench/kernels/moe_bench.py times the path)
DOWN_BLOCKS = (8, 256)


@triton.jit
def _gate_up_kernel(x, w, h, ids, top_k, E, N, K, stride_xm, stride_we, stride_wn, stride_hm,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pair = tl.program_id(0)
    e = tl.load(ids + pair)
    if (e < 0) | (e >= E):
        return
    t = pair // top_k
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    rows = w + e.to(tl.int64) * stride_we + offs_n[:, None].to(tl.int64) * stride_wn
    acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        xv = tl.load(x + t * stride_xm + kk, mask=k_ok, other=0.0).to(tl.float32)
        g = tl.load(rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        u = tl.load(rows + N * stride_wn + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        acc_g += tl.sum(g * xv[None, :], axis=1)
        acc_u += tl.sum(u * xv[None, :], axis=1)
    out = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    tl.store(h + pair * stride_hm + offs_n, out.to(h.dtype.element_ty), mask=n_ok)


@triton.jit
def _down_sum_kernel(h, w, out, ids, weights, E, N, K, stride_hm, stride_we, stride_wn, stride_om,
                     TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        pair = t * TOP_K + j
        e = tl.load(ids + pair)
        ok = (e >= 0) & (e < E)
        k_end = tl.where(ok, K, 0)  # another rank's pair: nothing loaded, nothing added
        rows = w + tl.where(ok, e, 0).to(tl.int64) * stride_we + offs_n[:, None].to(tl.int64) * stride_wn
        part = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < k_end
            hv = tl.load(h + pair * stride_hm + kk, mask=k_ok, other=0.0).to(tl.float32)
            b = tl.load(rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            part += tl.sum(b * hv[None, :], axis=1)
        acc += tl.where(ok, tl.load(weights + pair), 0.0) * part
    tl.store(out + t * stride_om + offs_n, acc.to(out.dtype.element_ty), mask=n_ok)


def fused_moe_gemv(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                   ids: torch.Tensor) -> torch.Tensor:
    """``triton_moe.fused_moe`` by per-pair GEMVs (contiguous inputs, float32 ``weights``)."""
    t, hidden = x.shape
    experts, inter, k = w13.shape[0], w13.shape[1] // 2, ids.shape[1]
    h = torch.empty(t * k, inter, dtype=x.dtype, device=x.device)
    bn, bk = GATE_UP_BLOCKS
    _gate_up_kernel[(t * k, triton.cdiv(inter, bn))](x, w13, h, ids, k, experts, inter, hidden, x.stride(0),
                                                     w13.stride(0), w13.stride(1), h.stride(0),
                                                     BLOCK_N=bn, BLOCK_K=bk, num_warps=4)
    out = torch.empty_like(x)
    bn, bk = DOWN_BLOCKS
    _down_sum_kernel[(t, triton.cdiv(hidden, bn))](h, w2, out, ids, weights, experts, hidden, inter, h.stride(0),
                                                   w2.stride(0), w2.stride(1), out.stride(0),
                                                   TOP_K=k, BLOCK_N=bn, BLOCK_K=bk, num_warps=4)
    return out
