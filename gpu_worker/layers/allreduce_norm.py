"""All-reduce fused with the residual add and RMSNorm that follow every row-parallel layer.

With tensor parallelism a decoder layer ends twice in ``all_reduce(partial)`` followed by
``rms_norm(x + residual)``: two launches, and at batch-1 decode the all-reduce is pure latency.
This kernel does both in one launch over buffers that every TP rank of the machine maps
(PyTorch symmetric memory, set up in ``distributed.py``, held in ``fused_reduce.py``). One program per row:

1. push this rank's partial row into every peer's buffer (its own region there, slot ``c % 2``,
   ``c`` = the row's call count): stores over NVLink that need no answer;
2. tell every peer "row p of call c is there" (a release store of ``c`` into the peer's flag
   array) and wait until every peer has said the same (acquire loads of the own flag array);
3. sum the ranks' rows in rank order (so every rank gets the same bits) from the own buffer,
   round to the activation dtype as an all-reduce would, then add the residual and normalise
   with ``triton_ops``'s own row code.

Pushing rather than pulling keeps the wait and the reads on local memory: the only crossing of
NVLink on the critical path is one way (the first version read the peers' rows remotely and
took 6.6 us a call at batch 1 on two H200s).

Why two slots: a rank can only start call ``c + 2`` of row p after its peers signalled call
``c + 1``, which they do after they finished reading call ``c``; so a slot is never overwritten
while its owner reads it. The call counts live in device memory (one per row), so CUDA-graph
replays count on by themselves; they run modulo 2**16 (an int32 count would overflow after about
a day of serving), so a flag is "there" when it reads ``c`` or, once the peer has moved on to the
next call, ``c + 1``. The row-to-program mapping is fixed, which is what makes the
per-row argument hold when batch sizes change between calls.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from treadle.gpu_worker.layers.pdl import pdl_launch, pdl_start, pdl_supported
from treadle.gpu_worker.layers.triton_ops import store_rms_norm_row


@triton.jit
def _allreduce_rms_norm_kernel(x_ptr, x_stride, r_ptr, r_stride, out_ptr, res_out_ptr, w_ptr,
                               buf_ptrs, flag_ptrs, counters, slot_elems, max_rows, n, eps,
                               RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    c = (tl.load(counters + row) + 1) & 0xFFFF  # counts modulo 2**16, see the module doc
    dtype = x_ptr.dtype.element_ty

    x = tl.load(x_ptr + row.to(tl.int64) * x_stride + cols, mask=mask, other=0.0)
    region = ((c % 2) * WORLD + RANK).to(tl.int64) * slot_elems + row.to(tl.int64) * n  # ours, in every buffer
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            dst = tl.load(buf_ptrs + peer).to(tl.pointer_type(dtype))
            tl.store(dst + region + cols, x, mask=mask)
    tl.debug_barrier()  # every thread's part of the row is stored before the release below
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            peer_flags = tl.load(flag_ptrs + peer).to(tl.pointer_type(tl.int32))
            tl.atomic_xchg(peer_flags + RANK * max_rows + row, c, sem="release", scope="sys")
    my_flags = tl.load(flag_ptrs + RANK).to(tl.pointer_type(tl.int32))
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            seen = tl.atomic_add(my_flags + peer * max_rows + row, 0, sem="acquire", scope="sys")
            while ((seen - c) & 0xFFFF) > 1:  # neither call c nor (peer a call ahead) c + 1 yet
                seen = tl.atomic_add(my_flags + peer * max_rows + row, 0, sem="acquire", scope="sys")
    tl.debug_barrier()
    tl.store(counters + row, c)

    own = tl.load(buf_ptrs + RANK).to(tl.pointer_type(dtype))
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for peer in tl.static_range(WORLD):
        if peer == RANK:
            acc += x.to(tl.float32)
        else:
            src = own + ((c % 2) * WORLD + peer).to(tl.int64) * slot_elems + row.to(tl.int64) * n
            acc += tl.load(src + cols, mask=mask, other=0.0, volatile=True).to(tl.float32)
    _add_and_norm(acc.to(dtype), r_ptr + row.to(tl.int64) * r_stride, res_out_ptr + row.to(tl.int64) * n,
                  out_ptr + row.to(tl.int64) * n, w_ptr, cols, mask, n, eps)


@triton.jit
def _add_and_norm(h, r_row, res_out_row, out_row, w_ptr, cols, mask, n, eps):
    """The end of both kernels: ``h`` (the ranks' sum, rounded to the activation dtype as an
    all-reduce hands it on) plus the residual row, stored, then normalised and stored."""
    r = tl.load(r_row + cols, mask=mask, other=0.0)
    h = (h.to(tl.float32) + r.to(tl.float32)).to(res_out_row.dtype.element_ty)
    tl.store(res_out_row + cols, h, mask=mask)
    store_rms_norm_row(h, cols, mask, n, eps, w_ptr, out_row)


def allreduce_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       buf_ptrs: torch.Tensor, flag_ptrs: torch.Tensor, counters: torch.Tensor,
                       slot_elems: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(sum_ranks(x) + residual), sum_ranks(x) + residual)`` for ``x, residual [T, n]``.

    ``buf_ptrs``/``flag_ptrs``: int64 device tensors with every rank's buffer / flag-array address
    (buffers ``[2 slots, world source ranks, slot_elems]``; flags ``[world, max_rows]`` int32,
    zeroed at start);
    ``counters``: this rank's ``[max_rows]`` int32 call counts. ``T <= max_rows`` and
    ``T * n <= slot_elems``: the caller checks, every rank calls with the same shapes.
    """
    t, n = x.shape
    max_rows = counters.shape[0]
    out = torch.empty((t, n), dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    res_out = torch.empty((t, n), dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
    if t:
        block = triton.next_power_of_2(n)
        _allreduce_rms_norm_kernel[(t,)](x, x.stride(0), residual, residual.stride(0), out, res_out, weight,
                                         buf_ptrs, flag_ptrs, counters, slot_elems, max_rows, n, eps,
                                         RANK=rank, WORLD=world, BLOCK=block, num_warps=4 if block < 2048 else 8,
                                         **pdl_launch(pdl_supported(x.device)))
    return out, res_out


# ---- batch 1: the row arrives with the GEMV ---------------------------------------------------
# At batch-1 decode the row-parallel GEMV before the norm (``triton_gemv.py``) can push its outputs
# into the peers' word buffers itself, each program as soon as its rows are done, so the NVLink
# trip overlaps the GEMV's tail instead of following it. Each value then travels in one word
# together with the call count (a bf16/fp16 value in the low half of a 32-bit word, float32 in a
# 64-bit one), written whole, so a word that carries ``c`` *is* the peer's value of call ``c``:
# no flag, no fence; the norm below reads its own buffer until every word carries ``c``.
# The counts (``word_count``, one, modulo 2**16) are apart from the row counts above, so each
# protocol's counts run on without gaps; slots alternate as above, for the same reason.
# (Whole-row polling by hundreds of rows flooded L2 on the CI workload, so larger batches keep
# the flags.)

@triton.jit
def pack_words(x, c, WIDE: tl.constexpr):
    """Values ``x`` (activation dtype) as words tagged with call count ``c`` in the high half."""
    if WIDE:  # (an else, not a second return: Triton compiles the code after a static if's return)
        words = x.to(tl.uint32, bitcast=True).to(tl.uint64) | (c.to(tl.uint64) << 32)
    else:
        words = x.to(tl.uint16, bitcast=True).to(tl.uint32) | (c.to(tl.uint32) << 16)
    return words


@triton.jit
def push_words(y, idx, mask, word_ptrs, word_count, slot_elems, RANK: tl.constexpr, WORLD: tl.constexpr,
               WIDE: tl.constexpr):
    """Store values ``y`` (elements ``idx`` of this rank's row, activation dtype; ``WIDE``: float32)
    as call ``word_count + 1``'s words into every peer's buffer; called by the GEMV's programs."""
    c = (tl.load(word_count) + 1) & 0xFFFF
    words = pack_words(y, c, WIDE)
    region = ((c % 2) * WORLD + RANK).to(tl.int64) * slot_elems
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            dst = tl.load(word_ptrs + peer).to(tl.pointer_type(words.dtype))
            tl.store(dst + region + idx, words, mask=mask)


@triton.jit
def _unpack_words(w, WIDE: tl.constexpr, dtype: tl.constexpr):
    """The values of tagged words (``pack_words``' inverse), in ``dtype``."""
    bits = w.to(tl.uint32) if WIDE else w.to(tl.uint16)
    return bits.to(dtype, bitcast=True)


@triton.jit
def _wait_words(src, mask, c, WIDE: tl.constexpr):
    """Poll the words at ``src`` until every one under ``mask`` carries call count ``c``."""
    w = tl.load(src, mask=mask, volatile=True)
    while tl.sum((((w >> (32 if WIDE else 16)).to(tl.int32) != c) & mask).to(tl.int32), axis=0) > 0:
        w = tl.load(src, mask=mask, volatile=True)  # not all of call c yet
    return w


@triton.jit
def _pull_rms_norm_kernel(x_ptr, r_ptr, out_ptr, res_out_ptr, w_ptr, word_ptrs, word_count, slot_elems, n, eps,
                          RANK: tl.constexpr, WORLD: tl.constexpr, WIDE: tl.constexpr, NORM: tl.constexpr,
                          BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    c = (tl.load(word_count) + 1) & 0xFFFF
    tl.store(word_count, c)
    x = tl.load(x_ptr + cols, mask=mask, other=0.0)
    word = tl.uint64 if WIDE else tl.uint32
    own = tl.load(word_ptrs + RANK).to(tl.pointer_type(word))
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for peer in tl.static_range(WORLD):
        if peer == RANK:
            acc += x.to(tl.float32)
        else:
            w = _wait_words(own + ((c % 2) * WORLD + peer).to(tl.int64) * slot_elems + cols, mask, c, WIDE)
            acc += _unpack_words(w, WIDE, x.dtype).to(tl.float32)
    if NORM:
        _add_and_norm(acc.to(x.dtype), r_ptr, res_out_ptr, out_ptr, w_ptr, cols, mask, n, eps)  # the flag kernel's bits
    else:  # the sum alone, rounded as an all-reduce hands it on
        tl.store(out_ptr + cols, acc.to(x.dtype), mask=mask)


def pulled_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                    word_ptrs: torch.Tensor, word_count: torch.Tensor, slot_elems: int, rank: int,
                    world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``allreduce_rms_norm`` for one row ``x [1, n]`` whose GEMV pushed it to the peers already
    (``push_words``): reads the peers' words from the own buffer (``word_ptrs[rank]``)."""
    n = x.shape[1]
    out = torch.empty((1, n), dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    res_out = torch.empty((1, n), dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
    _pull(x, residual, out, res_out, weight, eps, word_ptrs, word_count, slot_elems, rank, world, norm=True)
    return out, res_out


def pulled_sum(x: torch.Tensor, word_ptrs: torch.Tensor, word_count: torch.Tensor, slot_elems: int, rank: int,
               world: int) -> torch.Tensor:
    """The all-reduce of one row ``x [1, n]`` that its kernel pushed to the peers already (the
    vocab-parallel embedding's): ``pulled_rms_norm`` without the residual and the norm."""
    out = torch.empty_like(x)
    _pull(x, x, out, out, x, 0.0, word_ptrs, word_count, slot_elems, rank, world, norm=False)
    return out


def _pull(x, residual, out, res_out, weight, eps, word_ptrs, word_count, slot_elems, rank, world, norm):
    block = triton.next_power_of_2(x.shape[1])
    _pull_rms_norm_kernel[(1,)](x, residual, out, res_out, weight, word_ptrs, word_count, slot_elems, x.shape[1],
                                eps, RANK=rank, WORLD=world, WIDE=x.element_size() == 4, NORM=norm, BLOCK=block,
                                num_warps=4 if block < 2048 else 8, **pdl_launch(pdl_supported(x.device)))


# ---- the vocab-parallel LM head at batch 1: logits gathered as tagged words -------------------
# The head's GEMV pushes its shard of the logits into every peer's gather buffer with
# ``push_words`` (its own channel and count, so it never meets the rows above); ``gathered_logits``
# then writes the whole float32 row, many programs each polling one chunk of one peer's words.
# The last program to finish (an atomic count of finished programs) moves the call count on.

@triton.jit
def _gather_logits_kernel(y_ptr, out_ptr, word_ptrs, word_count, done, shard, vocab, slot_elems,
                          RANK: tl.constexpr, WORLD: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr,
                          PDL: tl.constexpr):
    pdl_start(PDL)
    src = tl.program_id(1)  # whose shard
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    col = src * shard + j
    mask = (j < shard) & (col < vocab)
    c = (tl.load(word_count) + 1) & 0xFFFF
    if src == RANK:
        v = tl.load(y_ptr + j, mask=mask, other=0.0).to(tl.float32)
    else:
        own = tl.load(word_ptrs + RANK).to(tl.pointer_type(tl.uint64 if WIDE else tl.uint32))
        w = _wait_words(own + ((c % 2) * WORLD + src).to(tl.int64) * slot_elems + j, mask, c, WIDE)
        v = _unpack_words(w, WIDE, y_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + col, v, mask=mask)
    if tl.atomic_add(done, 1) == tl.num_programs(0) * tl.num_programs(1) - 1:  # every program has read c
        tl.store(word_count, c)
        tl.store(done, 0)


def gathered_logits(y: torch.Tensor, vocab: int, word_ptrs: torch.Tensor, word_count: torch.Tensor,
                    done: torch.Tensor, slot_elems: int, rank: int, world: int) -> torch.Tensor:
    """float32 logits ``[1, vocab]`` from this rank's shard ``y [1, shard]`` (whose GEMV pushed it
    to the peers) and the peers' shards in the own gather buffer. ``done``: one int32, zero."""
    shard = y.shape[1]
    out = torch.empty((1, vocab), dtype=torch.float32, device=y.device)
    block = 1024
    _gather_logits_kernel[(triton.cdiv(shard, block), world)](
        y, out, word_ptrs, word_count, done, shard, vocab, slot_elems, RANK=rank, WORLD=world,
        WIDE=y.element_size() == 4, BLOCK=block, num_warps=4, **pdl_launch(pdl_supported(y.device)))
    return out


def word_dtype(dtype: torch.dtype) -> torch.dtype:
    """The word buffer's element: a value and its 16-bit tag (float32 values take 64-bit words)."""
    if dtype.itemsize not in (2, 4):
        raise ValueError(f"tagged words hold 16- or 32-bit activations, not {dtype}")
    return torch.int64 if dtype.itemsize == 4 else torch.int32
