"""Attention backends: store the step's K/V into the cache, then attend through req_to_token.

A backend is created once per runner. ``init_forward`` runs once per step to precompute
metadata shared by all layers (index tensors, masks, kernel work lists); ``forward`` runs per
layer. New backends register in ``_BACKENDS`` (the ``triton`` one is imported lazily so that
CPU-only installs never need triton).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Optional

import torch

if TYPE_CHECKING:
    from treadle.gpu_worker.forward_context import ForwardContext
    from treadle.gpu_worker.layers.attention import Attention
    from treadle.gpu_worker.layers.rotary import RotaryEmbedding


class AttentionBackend(ABC):
    def init_forward(self, ctx: "ForwardContext") -> Any:
        """Per-step metadata, stored by the runner in ``ctx.attn_meta``."""
        return None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: "Attention",
                ctx: "ForwardContext", rotary: Optional["RotaryEmbedding"] = None) -> torch.Tensor:
        """``q [T, H, D]``, ``k/v [T, Hkv, D]`` -> ``[T, H, D]``; with ``rotary``, q and k are rotated
        first (at ``ctx.positions``), in the same kernel as the K/V store on CUDA."""
        if rotary is None:
            ctx.kv_cache.store(layer.layer_id, ctx.out_cache_loc, k, v)
        else:
            q = ctx.kv_cache.rotate_and_store(layer.layer_id, ctx.out_cache_loc, rotary, ctx.positions, q, k, v)
        return self.attend(q, layer, ctx)

    @abstractmethod
    def attend(self, q: torch.Tensor, layer: "Attention", ctx: "ForwardContext") -> torch.Tensor:
        """Attention of the new tokens over their slots' cached K/V (new tokens included)."""


_BACKENDS = {
    "torch_native": "treadle.gpu_worker.attention.torch_native:TorchNativeBackend",
    "triton": "treadle.gpu_worker.attention.triton_backend:TritonBackend",
    # enable_deterministic_inference: batch- and chunk-invariant variants (ModelRunner picks them)
    "torch_native_deterministic": "treadle.gpu_worker.attention.torch_deterministic:TorchDeterministicBackend",
    "triton_deterministic": "treadle.gpu_worker.attention.triton_deterministic:TritonDeterministicBackend",
}


def create_backend(name: str, **kwargs: Any) -> AttentionBackend:
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {sorted(_BACKENDS)}")
    module, cls = _BACKENDS[name].split(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        raise NotImplementedError(f"attention backend {name!r} is not implemented yet") from e
    return getattr(mod, cls)(**kwargs)
