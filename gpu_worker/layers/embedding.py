"""Vocab-parallel token embedding and LM head.

Each rank holds a contiguous slice of the (padded) vocabulary. The embedding zeroes ids that
belong to other ranks and all-reduces; the head all-gathers its logit shards. With tied
embeddings the model points ``lm_head.weight`` at ``embed_tokens.weight``.

At batch-1 decode on one machine both trips ride on tagged words (``allreduce_norm.py``): the
embedding's kernel pushes its row to the peers and the all-reduce only pulls; the head's GEMV
pushes its logits and one kernel gathers the float32 row (no NCCL call in the step).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

from treadle.gpu_worker.distributed import all_gather_last_dim, all_reduce, tp_rank, tp_size
from treadle.gpu_worker.fused_reduce import (PushTarget, gather_logits, gemv_push_target, logits_push_target,
                                             note_pushed)
from treadle.gpu_worker.layers.allreduce_norm import push_words
from treadle.gpu_worker.layers.pdl import pdl_launch, pdl_start, pdl_supported
from treadle.gpu_worker.layers.triton_gemv import GemvConfig, project, takes_gemv


@triton.jit
def _shard_embedding_kernel(ids_ptr, w_ptr, out_ptr, start, end, n, word_ptrs, word_count, slot_elems,
                            PUSH: tl.constexpr, RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr,
                            PDL: tl.constexpr):
    pdl_start(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    tok = tl.load(ids_ptr + row)
    mine = (tok >= start) & (tok < end)
    local = tl.where(mine, tok - start, 0).to(tl.int64)
    y = tl.load(w_ptr + local * n + cols, mask=cols < tl.where(mine, n, 0), other=0.0)  # zeros: not ours
    tl.store(out_ptr + row.to(tl.int64) * n + cols, y, mask=mask)
    if PUSH:  # batch 1: straight to the peers, the all-reduce after this only pulls
        push_words(y, cols, mask, word_ptrs, word_count, slot_elems, RANK, WORLD,
                   out_ptr.dtype.element_ty.primitive_bitwidth == 32)


def shard_embedding(ids: torch.Tensor, weight: torch.Tensor, start: int, end: int,
                    push: Optional[PushTarget] = None) -> torch.Tensor:
    """Rows of ``weight`` (this rank's vocab slice ``[start, end)``) for ``ids``, zero where an id
    is another rank's: this rank's part of the embedding's all-reduce, in one launch."""
    t, n = ids.shape[0], weight.shape[1]
    out = torch.empty((t, n), dtype=weight.dtype, device=weight.device)
    if t:
        word_ptrs, word_count, slot_elems, rank, world = (ids, ids, 0, 0, 1) if push is None else push  # (ids: unused)
        block = triton.next_power_of_2(n)
        _shard_embedding_kernel[(t,)](ids, weight, out, start, end, n, word_ptrs, word_count, slot_elems,
                                      PUSH=push is not None, RANK=rank, WORLD=world, BLOCK=block,
                                      num_warps=4 if block < 2048 else 8, **pdl_launch(pdl_supported(ids.device)))
    return out


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.per_rank = -(-num_embeddings // tp_size())
        self.start = tp_rank() * self.per_rank
        self.end = min(self.start + self.per_rank, num_embeddings)
        self.weight = nn.Parameter(torch.empty(self.per_rank, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, full: torch.Tensor, shard_id=None) -> None:
        n = self.end - self.start
        param.data[:n].copy_(full[self.start:self.end])
        param.data[n:].zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if tp_size() == 1:
            return F.embedding(ids, self.weight)
        if ids.is_cuda and ids.dim() == 1:
            push = gemv_push_target(self.weight.shape[1], self.weight.dtype) if ids.shape[0] == 1 else None
            y = shard_embedding(ids, self.weight, self.start, self.end, push)
            if push is not None:
                note_pushed(y)
            return all_reduce(y)
        mask = (ids >= self.start) & (ids < self.end)
        y = F.embedding((ids - self.start) * mask, self.weight)
        return all_reduce(y.masked_fill_(~mask.unsqueeze(-1), 0))


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states to logits over the full vocabulary (padding columns cut off)."""

    gemv_config: Optional[GemvConfig] = None  # set by linear.use_triton_gemv: one token by the Triton GEMV

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        push = None
        if tp_size() > 1 and takes_gemv(x, self.gemv_config):
            push = logits_push_target(self.weight.shape[0], x.dtype)
        y = project(x, self.weight, None, self.gemv_config, push)
        if push is not None:
            return gather_logits(y, self.num_embeddings)  # float32 already
        return all_gather_last_dim(y)[..., : self.num_embeddings]
