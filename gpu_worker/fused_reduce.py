"""The fused all-reduce path's shared state on one machine's TP ranks, and the calls that use it.

``distributed.init_parallel`` (with ``custom_all_reduce`` and ``enable_allreduce_fusion``, no
pipeline stages) maps symmetric buffers on every TP rank and hands them here (``set_state``):

- ``fused_all_reduce_rms_norm``: the reduce before each RMSNorm, the residual add and the norm in
  one kernel (``layers/allreduce_norm.py``), for up to ``FUSED_MAX_ROWS`` rows.
- Batch 1: a row-parallel GEMV or the embedding pushes its partial row to the peers as tagged words
  (``gemv_push_target``, then ``note_pushed``), and the next fused norm or ``distributed.all_reduce``
  pulls it; the LM head pushes its logits shard the same way (``logits_push_target``,
  ``gather_logits``). Every push needs its pull before the next one: the call counts stay in step.

Without the state (CPU, NCCL only, pipeline stages, fusion off) every call here declines (``None``)
and the caller reduces by ``distributed.all_reduce``. The state is per process, as the rest of the
parallel state is, and knows its rank and world, so nothing here reads ``distributed``'s globals.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch

FUSED_MAX_ROWS = 256  # decode batches up to the largest captured graph
WORD_ROW_MAX = 16384  # widest row (hidden size) a GEMV may push as tagged words
GATHER_WORDS_MAX = 1 << 18  # widest vocab shard the LM head may gather as tagged words
_STATE: Optional["FusedNormState"] = None  # all-reduce + residual + RMSNorm in one kernel (None: unfused)


class FusedNormState:
    """Shared buffers of ``layers/allreduce_norm.py``: two slots with a region of rows for every
    source rank (the peers push into theirs), per-row ready flags every peer writes into, and
    this rank's per-row call counts."""

    def __init__(self, symm_mem, group_name: str, device: torch.device, dtype: torch.dtype, rank: int, world: int,
                 slot_elems: int) -> None:
        def mapped(numel: int, of: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
            """A zeroed symmetric buffer (kept as an attribute) and every rank's address of it."""
            t = symm_mem.empty(numel, dtype=of, device=device).zero_()
            return t, self._peer_ptrs(symm_mem.rendezvous(t, group_name), t, device)

        self.dtype, self.rank, self.world = dtype, rank, world  # this stage's TP rank and size
        self.slot_elems = slot_elems  # the one-shot all-reduce's largest message, in elements
        self.buf, self.buf_ptrs = mapped(2 * world * slot_elems, dtype)
        self.flags, self.flag_ptrs = mapped(world * FUSED_MAX_ROWS, torch.int32)
        self.counters = torch.zeros(FUSED_MAX_ROWS, dtype=torch.int32, device=device)
        # Batch 1: the row-parallel GEMVs and the embedding push their rows as tagged words
        # (allreduce_norm.push_words), the next norm or all_reduce pulls them (tp 2 batch 1 on two
        # H200s: 386 tok/s against 372 with flags); the LM head pushes its logits shard the same
        # way. TREADLE_DISABLE_GEMV_PUSH=1 keeps the flags, the one-shot all-reduce and NCCL's
        # all-gather at batch 1 too (the same on every rank: the children inherit the
        # environment); the word buffers are then never allocated.
        self.gemv_push = os.environ.get("TREADLE_DISABLE_GEMV_PUSH", "") != "1"
        self.pushed_ptr: Optional[int] = None  # the pushed row that the next fused norm must pull
        if self.gemv_push:
            from treadle.gpu_worker.layers.allreduce_norm import word_dtype

            self.words, self.word_ptrs = mapped(2 * world * WORD_ROW_MAX, word_dtype(dtype))
            self.word_count = torch.zeros(1, dtype=torch.int32, device=device)
            # the LM head's logits at batch 1 (allreduce_norm.gathered_logits): a channel of their own
            self.gather, self.gather_ptrs = mapped(2 * world * GATHER_WORDS_MAX, word_dtype(dtype))
            counts = torch.zeros(2, dtype=torch.int32, device=device)
            self.gather_count, self.gather_done = counts[:1], counts[1:]  # the call count, finished programs

    def _peer_ptrs(self, handle, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Each rank's address of ``t``: the allocations are symmetric, so ``t`` sits at the same
        offset from every rank's base."""
        offset = t.data_ptr() - handle.buffer_ptrs[self.rank]
        return torch.tensor([p + offset for p in handle.buffer_ptrs], dtype=torch.int64, device=device)


def set_state(new: Optional[FusedNormState]) -> None:
    """This process's fused state (``distributed.init_parallel``; None: unfused)."""
    global _STATE
    _STATE = new


def state() -> Optional[FusedNormState]:
    return _STATE


def push_pending() -> bool:
    """A GEMV pushed its row (``note_pushed``) and no reduce has pulled it yet."""
    return _STATE is not None and _STATE.pushed_ptr is not None


class PushTarget(NamedTuple):
    """Where a one-token GEMV pushes its partial row (``allreduce_norm.push_words``)."""
    word_ptrs: torch.Tensor
    word_count: torch.Tensor
    slot_elems: int
    rank: int
    world: int


def gemv_push_target(n: int, dtype: torch.dtype) -> Optional[PushTarget]:
    """The push target for a one-token row-parallel GEMV of ``n`` outputs whose partial sum goes to
    a fused norm next, or None (push off, no fused state, row too wide, another dtype)."""
    f = _STATE
    if f is None or not f.gemv_push or n > WORD_ROW_MAX or dtype != f.dtype:
        return None
    return PushTarget(f.word_ptrs, f.word_count, WORD_ROW_MAX, f.rank, f.world)


def logits_push_target(n: int, dtype: torch.dtype) -> Optional[PushTarget]:
    """The push target for the one-token LM head GEMV of ``n`` vocab rows (this rank's shard), or
    None (push off, no fused state, shard too wide, another dtype); ``gather_logits`` follows."""
    f = _STATE
    if f is None or not f.gemv_push or n > GATHER_WORDS_MAX or dtype != f.dtype:
        return None
    return PushTarget(f.gather_ptrs, f.gather_count, GATHER_WORDS_MAX, f.rank, f.world)


def gather_logits(y: torch.Tensor, vocab: int) -> torch.Tensor:
    """float32 logits ``[1, vocab]`` from this rank's shard ``y`` that the LM head's GEMV pushed
    to the peers (``logits_push_target``): the peers' shards come from the own gather buffer."""
    from treadle.gpu_worker.layers.allreduce_norm import gathered_logits

    f = _STATE
    return gathered_logits(y, vocab, f.gather_ptrs, f.gather_count, f.gather_done, GATHER_WORDS_MAX, f.rank, f.world)


def note_pushed(y: torch.Tensor) -> None:
    """``y`` (this rank's partial row) went to the peers with its GEMV: the next fused norm pulls
    it. Every push needs its pull before the next push (the counts must stay in step)."""
    if _STATE.pushed_ptr is not None:
        raise RuntimeError("a GEMV pushed its row while the row pushed before was never reduced")
    _STATE.pushed_ptr = y.data_ptr()


def _claim_pushed(x: torch.Tensor) -> FusedNormState:
    """The pushed row (``note_pushed``) is being reduced now: check that ``x`` is it, clear it."""
    f = _STATE
    if x.data_ptr() != f.pushed_ptr or x.shape[0] != 1:
        raise RuntimeError("the row a kernel pushed must be the next one reduced")
    f.pushed_ptr = None
    return f


def pull_pushed(x: torch.Tensor) -> torch.Tensor:
    """``distributed.all_reduce`` of the row ``x`` its kernel pushed (``note_pushed``): the peers' words."""
    from treadle.gpu_worker.layers.allreduce_norm import pulled_sum

    f = _claim_pushed(x)
    return pulled_sum(x, f.word_ptrs, f.word_count, WORD_ROW_MAX, f.rank, f.world)


def fused_all_reduce_rms_norm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor,
                              eps: float) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``(rms_norm(all_reduce(x) + residual), all_reduce(x) + residual)`` in one kernel on this
    machine's TP ranks, or None where that path can't take it (CPU, NCCL only, pipeline stages,
    more rows than ``FUSED_MAX_ROWS``): the caller then all-reduces and normalises itself. Every
    rank sees the same shapes, so every rank takes the same path."""
    f = _STATE
    if f is not None and f.pushed_ptr is not None:
        if residual is None or residual.stride(-1) != 1:
            raise RuntimeError("the row a GEMV pushed must go to the next fused norm, with a residual")
        _claim_pushed(x)
        from treadle.gpu_worker.layers.allreduce_norm import pulled_rms_norm

        return pulled_rms_norm(x, residual, weight, eps, f.word_ptrs, f.word_count, WORD_ROW_MAX, f.rank, f.world)
    if (f is None or residual is None or x.dim() != 2 or x.dtype != f.dtype or x.shape[0] > FUSED_MAX_ROWS
            or x.numel() > f.slot_elems or x.stride(-1) != 1 or residual.stride(-1) != 1):
        return None
    from treadle.gpu_worker.layers.allreduce_norm import allreduce_rms_norm

    return allreduce_rms_norm(x, residual, weight, eps, f.buf_ptrs, f.flag_ptrs, f.counters, f.slot_elems,
                              f.rank, f.world)
