"""A Triton GEMV for one-token decode (``y = x @ W.T`` with ``x [1, K]``), with split-K in one launch.

At batch 1 every linear layer is a matrix-vector product bounded by reading ``W`` once, and
cuBLAS does not always pick a kernel that streams it at full bandwidth (on an H100, Llama-3.1-8B's
``o_proj`` ran at 1.6 TB/s where the larger projections ran at 2.85). This kernel streams the
weight tile by tile: program ``(n, s)`` reads ``BLOCK_N`` rows of ``W`` over its ``1 / SPLIT_K``
share of ``K`` and keeps a float32 dot product per row.

With ``SPLIT_K > 1`` the shares are added without a second launch: each program writes its
partial sums to a float32 workspace, then takes a ticket from a per-row-block counter; the
program that draws the last ticket adds the partials (in split order, so the result does not
depend on which program finished last), writes the output and resets the counter for the next
call (so a CUDA graph can replay it).

Not used by the models: on two H200s (2026-11-26, ``bench/gemv_bench.py``) cuBLAS beat the best
config of this kernel on every Llama-3.1-8B projection (3.2-4.4 TB/s against 2.0-3.3), and
wired into the layers it cut batch-1 decode from 213 to 82 tok/s. Kept with its bench and tests
as the measured baseline for a next attempt.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["n", "k"])
def _gemv_kernel(x_ptr, w_ptr, w_stride, out_ptr, ws_ptr, tickets_ptr, n, k,
                 K_PER_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                 ACC_2D: tl.constexpr):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_2d = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    lo = pid_k * K_PER_SPLIT
    hi = tl.minimum(lo + K_PER_SPLIT, k)
    # The trip count is a constexpr, not a runtime argument: Triton 3.6's interpreter holds a
    # runtime scalar as a 1-element array and its ``__index__`` calls ``int()`` on it, which recent
    # NumPy rejects (2.4 does), so ``range()`` over a runtime bound fails there. It costs one
    # compile per distinct K share (a few per model); the loop itself is the same.
    for k0 in range(0, K_PER_SPLIT, BLOCK_K):
        cols = lo + k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < hi
        x = tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rows[:, None].to(tl.int64) * w_stride + cols[None, :],
                    mask=row_mask[:, None] & col_mask[None, :], other=0.0, eviction_policy="evict_first")
        if ACC_2D:  # elementwise products only; one cross-thread reduction after the loop
            acc_2d += w.to(tl.float32) * x[None, :]
        else:
            acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    if ACC_2D:
        acc = tl.sum(acc_2d, axis=1)
    if SPLIT_K == 1:
        tl.store(out_ptr + rows, acc.to(out_ptr.dtype.element_ty), mask=row_mask)
    else:
        tl.store(ws_ptr + pid_k * n + rows, acc, mask=row_mask)
        tl.debug_barrier()  # the whole partial is stored before the ticket is drawn
        ticket = tl.atomic_add(tickets_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if ticket == SPLIT_K - 1:
            total = tl.zeros([BLOCK_N], dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                total += tl.load(ws_ptr + s * n + rows, mask=row_mask, other=0.0, volatile=True)
            tl.store(out_ptr + rows, total.to(out_ptr.dtype.element_ty), mask=row_mask)
            tl.atomic_xchg(tickets_ptr + pid_n, 0, sem="relaxed", scope="gpu")


class GemvWorkspace:
    """Float32 partials and zeroed tickets for the split-K path, grown on demand; allocate it
    before CUDA-graph capture (``reserve``) so captured launches keep pointing at it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.partials = torch.empty(0, dtype=torch.float32, device=device)
        self.tickets = torch.zeros(0, dtype=torch.int32, device=device)

    def reserve(self, partials: int, tickets: int) -> None:
        if self.partials.numel() < partials:
            self.partials = torch.empty(partials, dtype=torch.float32, device=self.device)
        if self.tickets.numel() < tickets:
            self.tickets = torch.zeros(tickets, dtype=torch.int32, device=self.device)


def gemv_config(n: int, k: int, num_sms: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, SPLIT_K): about four programs per SM, each streaming whole rows
    (split K only when the rows alone give too few programs)."""
    block_k = 512 if k >= 512 else triton.next_power_of_2(k)
    block_n = 16
    while block_n < 128 and triton.cdiv(n, 2 * block_n) >= 4 * num_sms:
        block_n *= 2
    split = 1
    while split < 8 and triton.cdiv(n, block_n) * split < 2 * num_sms and k // (2 * split) >= 4 * block_k:
        split *= 2
    return block_n, block_k, split


def gemv(x: torch.Tensor, w: torch.Tensor, workspace: GemvWorkspace, config: tuple[int, int, int],
         num_warps: int = 4, acc_2d: bool = False) -> torch.Tensor:
    """``x [1, K] @ w[N, K].T`` -> ``[1, N]`` in ``x``'s dtype (float32 accumulation)."""
    n, k = w.shape
    block_n, block_k, split = config
    grid = (triton.cdiv(n, block_n), split)
    if split > 1:
        workspace.reserve(split * n, grid[0])
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    k_per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    _gemv_kernel[grid](x, w, w.stride(0), out, workspace.partials, workspace.tickets, n, k, K_PER_SPLIT=k_per_split,
                       BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, ACC_2D=acc_2d,
                       num_warps=num_warps)
    return out
