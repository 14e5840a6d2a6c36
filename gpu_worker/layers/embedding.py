"""Vocab-parallel token embedding and LM head.

Each rank holds a contiguous slice of the (padded) vocabulary. The embedding zeroes ids that
belong to other ranks and all-reduces; the head all-gathers its logit shards. With tied
embeddings the model points ``lm_head.weight`` at ``embed_tokens.weight``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from treadle.gpu_worker.distributed import all_gather_last_dim, all_reduce, tp_rank, tp_size
from treadle.gpu_worker.layers.triton_gemv import GemvConfig, project


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
        mask = (ids >= self.start) & (ids < self.end)
        y = F.embedding((ids - self.start) * mask, self.weight)
        return all_reduce(y.masked_fill_(~mask.unsqueeze(-1), 0))


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states to logits over the full vocabulary (padding columns cut off)."""

    gemv_config: Optional[GemvConfig] = None  # set by linear.use_triton_gemv: one token by the Triton GEMV

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = all_gather_last_dim(project(x, self.weight, None, self.gemv_config))
        return logits[..., : self.num_embeddings]
