"""The batch metadata of the step being run, reachable from anywhere in the model.

Model code keeps plain ``forward(x)`` signatures (as in the HF checkpoints' layout); the few
layers that need batch facts (rotary positions, attention) read them from here. The runner sets
the context around each forward pass and clears it afterwards.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch

if TYPE_CHECKING:
    from treadle.gpu_worker.attention.base import AttentionBackend
    from treadle.gpu_worker.kv_cache import KVCache


@dataclass
class ForwardContext:
    input_ids: torch.Tensor  # [T] int64, all rows' tokens concatenated
    positions: torch.Tensor  # [T] int64, position of each token inside its request
    out_cache_loc: torch.Tensor  # [T] int64, KV-cache location where each token's K/V goes
    slots: list[int]  # per row: req-to-token row
    starts: list[int]  # per row: position of its first new token (= cached prefix length)
    extend_lens: list[int]  # per row: number of new tokens
    logits_indices: torch.Tensor  # [num_sample_rows] token index whose hidden state is projected
    req_to_token: torch.Tensor  # [max_slots, context_len]
    kv_cache: "KVCache"
    attn_backend: "AttentionBackend"
    attn_meta: Any = None  # whatever the backend precomputed once for all layers
    # Multimodal prefill on the first pipeline stage: (token indices [M] in the step, vision
    # embeddings [M, hidden] that replace those tokens' embeddings); None: text only.
    mm_embeds: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    # Tree rows of speculative decoding (spec_tree.py), by row index: (the KV locations of the row's
    # own keys [L], mask [n, L] of which of them each new token sees); the cached prefix
    # ``req_to_token[slot, :start]`` is seen whole. None: every row is causal.
    tree: Optional[dict[int, tuple[torch.Tensor, torch.Tensor]]] = None

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]


_CTX: Optional[ForwardContext] = None


def get_forward_context() -> ForwardContext:
    if _CTX is None:
        raise RuntimeError("no forward context: model code ran outside ModelRunner.forward")
    return _CTX


@contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    global _CTX
    prev, _CTX = _CTX, ctx
    try:
        yield ctx
    finally:
        _CTX = prev
