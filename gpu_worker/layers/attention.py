"""The attention layer seen by model code: ``attn(q, k, v)``; the backend does the work.

It carries the per-layer facts a backend needs (layer id for the KV cache, head counts, scale,
and the per-layer options every backend honours: ``sliding_window`` W, where a query at
position p sees keys at positions ``> p - W`` as in transformers' sliding-window mask, and
``logit_cap`` c, scores ``c * tanh(s / c)`` before the softmax as Gemma 2's soft-capping) and
forwards to the backend chosen for this runner through the forward context.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from treadle.gpu_worker.forward_context import get_forward_context
from treadle.gpu_worker.layers.rotary import RotaryEmbedding
from treadle.runtime.hf_config import sliding_window


def layer_windows(config) -> list[Optional[int]]:
    """Each layer's attention window (None: full), as transformers assigns them: by
    ``config.layer_types`` where the config has them (Gemma 2/3 alternate, Qwen2 with
    ``use_sliding_window``), else the config's one ``sliding_window`` on every layer (Mistral)."""
    n, types = config.num_hidden_layers, getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if types:
        if len(types) != n:
            raise ValueError(f"config.layer_types has {len(types)} entries for num_hidden_layers={n}")
        return [window if t == "sliding_attention" and window else None for t in types]
    return [sliding_window(config.to_dict())] * n


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scaling: float, layer_id: int,
                 sliding_window: Optional[int] = None, logit_cap: Optional[float] = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scaling, self.layer_id = scaling, layer_id
        if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
            raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window!r}")
        if logit_cap is not None and not logit_cap > 0:
            raise ValueError(f"logit_cap must be positive or None, got {logit_cap!r}")
        self.sliding_window = sliding_window  # None: full causal attention
        self.logit_cap = float(logit_cap) if logit_cap else None  # None: no soft-capping

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                rotary: Optional[RotaryEmbedding] = None) -> torch.Tensor:
        """Flat ``[T, heads*head_dim]`` in, flat ``[T, heads*head_dim]`` out. ``rotary``: apply RoPE
        to q and k here, where the backend can fuse it with the K/V store."""
        ctx = get_forward_context()
        t = q.shape[0]
        out = ctx.attn_backend.forward(
            q.view(t, self.num_heads, self.head_dim),
            k.view(t, self.num_kv_heads, self.head_dim),
            v.view(t, self.num_kv_heads, self.head_dim),
            self, ctx, rotary)
        return out.reshape(t, self.num_heads * self.head_dim)
