"""All-reduce fused with the residual add and RMSNorm that follow every row-parallel layer.

With tensor parallelism a decoder layer ends twice in ``all_reduce(partial)`` followed by
``rms_norm(x + residual)``: two launches, and at batch-1 decode the all-reduce is pure latency.
This kernel does both in one launch over buffers that every TP rank of the machine maps
(PyTorch symmetric memory, set up in ``distributed.py``). One program per row:

1. push this rank's partial row into every peer's buffer (its own region there, slot ``c % 2``,
   ``c`` = the row's call count): stores over NVLink that need no answer. Each value travels as
   one word with the call count beside it (a bf16/fp16 value in the low half of a 32-bit word,
   float32 in a 64-bit one), and a word is stored whole, so a word that carries ``c`` *is* the
   peer's value of call ``c``: no ready flag, no release fence;
2. read the peers' rows from the own buffer until every word carries ``c`` (volatile loads of
   local memory), then sum the ranks' rows in rank order (so every rank gets the same bits),
   round to the activation dtype as an all-reduce would, add the residual and normalise with
   ``triton_ops``'s own row code.

Pushing rather than pulling keeps the wait and the reads on local memory, and carrying the count
in the data saves the release fence (which waits for the pushed stores to be acknowledged across
NVLink) and the flag's own trip: the only crossing on the critical path is the data's, one way.
(The first version read the peers' rows remotely: 6.6 us a call at batch 1 on two H200s.)

Why two slots: a rank can only start call ``c + 2`` of row p after it has read its peers' call
``c + 1``, which they push after they finished reading call ``c`` (each call is a kernel of its
own, after its predecessors ended); so a slot is never overwritten while its owner reads it, and
a stale word there carries ``c - 2``. The call counts live in device memory (one per row, modulo
2**16 as the word's tag), so CUDA-graph replays count on by themselves. The row-to-program
mapping is fixed, which is what makes the per-row argument hold when batch sizes change between
calls.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from treadle.gpu_worker.layers.pdl import pdl_launch, pdl_start, pdl_supported
from treadle.gpu_worker.layers.triton_ops import store_rms_norm_row


@triton.jit
def _pack(x, c, WIDE: tl.constexpr):
    """Values ``x`` as words tagged with call count ``c`` in the high half."""
    if WIDE:
        return x.to(tl.uint32, bitcast=True).to(tl.uint64) | (c.to(tl.uint64) << 32)
    return x.to(tl.uint16, bitcast=True).to(tl.uint32) | (c.to(tl.uint32) << 16)


@triton.jit
def _tag(w, WIDE: tl.constexpr):
    return (w >> 32).to(tl.int32) if WIDE else (w >> 16).to(tl.int32)


@triton.jit
def _unpack(w, like, WIDE: tl.constexpr):
    """The values of words ``w``, in the dtype of ``like``."""
    if WIDE:
        return w.to(tl.uint32).to(like.dtype, bitcast=True)
    return w.to(tl.uint16).to(like.dtype, bitcast=True)


@triton.jit
def _allreduce_rms_norm_kernel(x_ptr, x_stride, r_ptr, r_stride, out_ptr, res_out_ptr, w_ptr,
                               buf_ptrs, counters, slot_elems, n, eps, RANK: tl.constexpr, WORLD: tl.constexpr,
                               WIDE: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    c = (tl.load(counters + row) + 1) & 0xFFFF
    dtype = x_ptr.dtype.element_ty
    word = tl.uint64 if WIDE else tl.uint32

    x = tl.load(x_ptr + row.to(tl.int64) * x_stride + cols, mask=mask, other=0.0)
    words = _pack(x, c, WIDE)
    region = ((c % 2) * WORLD + RANK).to(tl.int64) * slot_elems + row.to(tl.int64) * n  # ours, in every buffer
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            dst = tl.load(buf_ptrs + peer).to(tl.pointer_type(word))
            tl.store(dst + region + cols, words, mask=mask)
    tl.store(counters + row, c)

    own = tl.load(buf_ptrs + RANK).to(tl.pointer_type(word))
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for peer in tl.static_range(WORLD):
        if peer == RANK:
            acc += x.to(tl.float32)
        else:
            src = own + ((c % 2) * WORLD + peer).to(tl.int64) * slot_elems + row.to(tl.int64) * n + cols
            w = tl.load(src, mask=mask, volatile=True)
            while tl.sum(((_tag(w, WIDE) != c) & mask).to(tl.int32), axis=0) > 0:  # not all of call c yet
                w = tl.load(src, mask=mask, volatile=True)
            acc += _unpack(w, x, WIDE).to(tl.float32)
    h = acc.to(dtype)  # what the all-reduce would have handed on
    r = tl.load(r_ptr + row.to(tl.int64) * r_stride + cols, mask=mask, other=0.0)
    h = (h.to(tl.float32) + r.to(tl.float32)).to(res_out_ptr.dtype.element_ty)
    tl.store(res_out_ptr + row.to(tl.int64) * n + cols, h, mask=mask)
    store_rms_norm_row(h, cols, mask, n, eps, w_ptr, out_ptr + row.to(tl.int64) * n)


def word_dtype(dtype: torch.dtype) -> torch.dtype:
    """The buffer's word: a value and its 16-bit tag (float32 values take 64-bit words)."""
    if dtype.itemsize not in (2, 4):
        raise ValueError(f"the fused all-reduce takes 16- or 32-bit activations, not {dtype}")
    return torch.int64 if dtype.itemsize == 4 else torch.int32


def allreduce_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       buf_ptrs: torch.Tensor, counters: torch.Tensor, slot_elems: int, rank: int,
                       world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(sum_ranks(x) + residual), sum_ranks(x) + residual)`` for ``x, residual [T, n]``.

    ``buf_ptrs``: int64 device tensor with every rank's buffer address (buffers of
    ``word_dtype(x.dtype)`` words ``[2 slots, world source ranks, slot_elems]``, zeroed at start);
    ``counters``: this rank's ``[max_rows]`` int32 call counts. ``T <= max_rows`` and
    ``T * n <= slot_elems``: the caller checks, every rank calls with the same shapes.
    """
    t, n = x.shape
    out = torch.empty((t, n), dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    res_out = torch.empty((t, n), dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
    if t:
        block = triton.next_power_of_2(n)
        _allreduce_rms_norm_kernel[(t,)](x, x.stride(0), residual, residual.stride(0), out, res_out, weight,
                                         buf_ptrs, counters, slot_elems, n, eps, RANK=rank, WORLD=world,
                                         WIDE=x.element_size() == 4, BLOCK=block,
                                         num_warps=4 if block < 2048 else 8, **pdl_launch(pdl_supported(x.device)))
    return out, res_out
