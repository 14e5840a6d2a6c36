"""CUDA kernels of the batch-invariant mode (``batch_invariant.py``): a matmul and a row logsumexp.

cuBLAS picks a kernel (tile shape, split-K, stream-K) per problem shape, so a row of ``x W^T``
comes out of a different reduction order when the batch has 1, 7 or 300 rows. Here one compiled
kernel with one tile config serves every M: program (m, n) reduces its tile over K in ``BLOCK_K``
steps, in order, with no split of K; a row's place in its M tile changes nothing (a tensor-core
MMA computes each output element the same way). ``M`` is not specialized, so M=1 runs the same
code as M=4096. The cost is cuBLAS's shape tuning: the numbers are in docs/perf.md.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

# One config for every shape (the point of the mode). 64-row tiles keep small batches from paying
# for 128 rows; 128-wide N tiles and 64-deep K steps are the usual bf16 choice on Hopper/Ampere.
BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, NUM_WARPS, NUM_STAGES = 64, 128, 64, 8, 4, 3
LSE_BLOCK = 1024


@triton.jit(do_not_specialize=["M"])
def _matmul_kernel(a_ptr, b_ptr, bias_ptr, c_ptr, M, N, K, stride_am, stride_bn, stride_cm,
                   HAS_BIAS: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)  # grouped order: neighbouring programs share B tiles in L2
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + rm[:, None].to(tl.int64) * stride_am
    b_rows = b_ptr + rn[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_rows + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(b_rows + kk[:, None], mask=(rn[None, :] < N) & (kk[:, None] < K), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    c = c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x [..., K] @ weight[N, K].T (+ bias)`` in ``x``'s dtype, float32 accumulation; float32
    inputs multiply in IEEE float32 (no TF32, as torch's default)."""
    shape, k = x.shape, x.shape[-1]
    a = x.reshape(-1, k)
    if a.stride(-1) != 1:
        a = a.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    m, n = a.shape[0], w.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m:
        grid = (triton.cdiv(m, BLOCK_M) * triton.cdiv(n, BLOCK_N),)
        _matmul_kernel[grid](a, w, w if bias is None else bias, out, m, n, k, a.stride(0), w.stride(0),
                             out.stride(0), HAS_BIAS=bias is not None,
                             PREC="ieee" if x.dtype == torch.float32 else "tf32", BLOCK_M=BLOCK_M,
                             BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M, num_warps=NUM_WARPS,
                             num_stages=NUM_STAGES)
    return out.view(*shape[:-1], n)


@triton.jit
def _lse_kernel(x_ptr, out_ptr, n, stride, BLOCK: tl.constexpr):
    """One program per row: per-lane running max and sum over the row in ``BLOCK`` steps, then one
    combine across lanes; the same order for a row whatever the number of rows."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    for c0 in range(0, n, BLOCK):
        x = tl.load(x_ptr + row * stride + c0 + cols, mask=c0 + cols < n, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a lane with no finite value yet
        s = s * tl.exp(m - safe) + tl.exp(x - safe)
        m = m_new
    mx = tl.max(m, 0)
    safe_mx = tl.where(mx == float("-inf"), 0.0, mx)
    total = tl.sum(s * tl.exp(m - safe_mx), 0)
    tl.store(out_ptr + row, tl.log(total) + safe_mx)


def row_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """``x.logsumexp(-1)`` of a 2-D CUDA tensor as float32, one fixed reduction per row."""
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    if x.shape[0]:
        xs = x if x.stride(-1) == 1 else x.contiguous()
        _lse_kernel[(x.shape[0],)](xs, out, x.shape[1], xs.stride(0), BLOCK=LSE_BLOCK, num_warps=4)
    return out
