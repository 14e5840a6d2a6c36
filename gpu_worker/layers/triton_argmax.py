"""Row-wise argmax for the sampler's greedy path, in two short Triton launches.

At batch-1 decode ``torch.argmax`` reduces the one 128k-wide logits row with a single block
(~27 us on an H200). Here stage 1 splits each row into ``P`` contiguous chunks, one program each
(a lone 128k row: 63 chunks of 2048, one tile each; over all rows at most ~4 programs per SM),
and writes one (key, index) partial per chunk; stage 2 reduces a row's ``P`` partials and writes
the int64 index. From ~530 rows on ``P`` is 1 and stage 1 writes the result itself (one launch).

Values are compared as int32 keys whose order is exactly ``torch.argmax``'s (CPU and CUDA): every
NaN is the maximum, ``-0.0 == 0.0``, and ties (NaNs among them) go to the lowest index.

Only allocations and launches, no host syncs: safe to capture in CUDA graphs.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from treadle.gpu_worker.layers.pdl import pdl_launch, pdl_start, pdl_supported

_BLOCK = 2048  # elements a program loads per step (8 per thread at 8 warps)
_MIN_CHUNK = 2048  # a chunk is at least this long: a 128k row gives 63 programs
_PROGRAMS_PER_SM = 4
_KEY_MIN = tl.constexpr(-2 ** 31)  # below every real key (-inf is -0x7F800000): masked lanes and padding


@triton.jit
def _order_key(x):
    """float32 -> int32, monotonic in torch's order: the sign-magnitude bits of a negative value
    negated (so ``-0.0`` and ``0.0`` both become 0), every NaN the largest int32."""
    b = x.to(tl.int32, bitcast=True)
    key = tl.where(b < 0, -(b & 0x7FFFFFFF), b)
    return tl.where(x != x, 0x7FFFFFFF, key)


@triton.jit
def _argmax_chunk_kernel(x_ptr, x_stride, key_ptr, idx_ptr, out_ptr, V, CHUNK, P,
                         BLOCK: tl.constexpr, FINAL: tl.constexpr, PDL: tl.constexpr):
    """Program (row, part): the largest key of ``row[part * CHUNK:][:CHUNK]`` and its first index.
    Each lane keeps its own running best (later tiles win only when strictly larger, so a lane
    keeps its first index); one cross-lane reduction at the end."""
    pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    start = part * CHUNK
    lanes = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], _KEY_MIN, tl.int32)
    at = tl.zeros([BLOCK], tl.int32)
    for s in range(start, tl.minimum(start + CHUNK, V), BLOCK):
        cols = s + lanes
        mask = cols < V
        x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        key = tl.where(mask, _order_key(x), _KEY_MIN)
        take = key > best
        best = tl.where(take, key, best)
        at = tl.where(take, cols, at)
    top = tl.max(best, axis=0)
    first = tl.min(tl.where(best == top, at, 0x7FFFFFFF), axis=0)
    if FINAL:
        tl.store(out_ptr + row, first.to(tl.int64))
    else:
        tl.store(key_ptr + row * P + part, top)
        tl.store(idx_ptr + row * P + part, first)


@triton.jit
def _argmax_merge_kernel(key_ptr, idx_ptr, out_ptr, P, BLOCK_P: tl.constexpr, PDL: tl.constexpr):
    """Program row: the largest of the row's ``P`` partial keys, the lowest index on ties."""
    pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_P)
    mask = offs < P
    key = tl.load(key_ptr + row * P + offs, mask=mask, other=_KEY_MIN)
    idx = tl.load(idx_ptr + row * P + offs, mask=mask, other=0x7FFFFFFF)
    top = tl.max(key, axis=0)
    tl.store(out_ptr + row, tl.min(tl.where(key == top, idx, 0x7FFFFFFF), axis=0).to(tl.int64))


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # Triton's interpreter (CPU tensors): as on an H100/H200
    return torch.cuda.get_device_properties(device).multi_processor_count


def plan(n: int, v: int, num_sms: int, parts: Optional[int] = None) -> tuple[int, int, int]:
    """``(block, chunk, P)`` for ``n`` rows of ``v``: by default enough chunks for about
    ``_PROGRAMS_PER_SM`` programs per SM over all rows (a 128k row alone: 63; 300 rows: 2), each at
    least ``_MIN_CHUNK`` long; ``parts`` asks for that many instead (tests). A chunk is whole tiles,
    so no tile spans two chunks, and none is empty."""
    if parts is None:
        parts = min(triton.cdiv(v, _MIN_CHUNK), triton.cdiv(_PROGRAMS_PER_SM * num_sms, n))
    block = min(_BLOCK, triton.next_power_of_2(v))
    chunk = triton.cdiv(triton.cdiv(v, max(parts, 1)), block) * block
    return block, chunk, triton.cdiv(v, chunk)


def argmax_rows(logits: torch.Tensor, parts: Optional[int] = None) -> torch.Tensor:
    """``torch.argmax(logits, dim=-1)`` of ``logits [n, V]`` (float32, bf16 or fp16; any row
    stride) as int64 ``[n]``; ``parts``: see ``plan``."""
    assert logits.dim() == 2 and logits.shape[1] > 0, "argmax_rows takes [n, V] with V > 0"
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    n, v = logits.shape
    out = torch.empty(n, dtype=torch.int64, device=logits.device)
    if n == 0:
        return out
    block, chunk, p = plan(n, v, _num_sms(logits.device), parts)
    pdl = pdl_launch(pdl_supported(logits.device))
    key = idx = out  # unused when P == 1: stage 1 writes the result
    if p > 1:
        key = torch.empty((n, p), dtype=torch.int32, device=logits.device)
        idx = torch.empty((n, p), dtype=torch.int32, device=logits.device)
    _argmax_chunk_kernel[(n, p)](logits, logits.stride(0), key, idx, out, v, chunk, p,
                                 BLOCK=block, FINAL=p == 1, num_warps=max(1, min(8, block // 256)), **pdl)
    if p > 1:
        _argmax_merge_kernel[(n,)](key, idx, out, p, BLOCK_P=triton.next_power_of_2(p), num_warps=1, **pdl)
    return out
