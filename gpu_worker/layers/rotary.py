"""Rotary position embedding (default, linear and Llama-3 scaling), as a cos/sin table.

The table has one row per position of the req-to-token table (``max_positions``), computed in
float32 on the CPU exactly like HF computes it on the fly, then cast to the activation dtype
when applied. Only half the head dim is stored: the two halves share frequencies.
"""

from __future__ import annotations

import math

import torch
from torch import nn

try:  # fused kernel for CUDA tensors; without triton (CPU-only installs) every call takes the torch path
    from treadle.gpu_worker.layers import triton_ops
except ImportError:
    triton_ops = None


def rope_parameters(config) -> dict:
    """The rope dict with ``rope_type`` and ``rope_theta``, for transformers 5 and older configs."""
    params = getattr(config, "rope_parameters", None)
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params = dict(params)
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def inv_frequencies(params: dict, rot_dim: int) -> torch.Tensor:
    base, kind = float(params["rope_theta"]), params["rope_type"]
    inv = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32, device="cpu") / rot_dim))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / params["factor"]
    if kind == "llama3":
        factor, lo, hi = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        old_len = params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / lo, inv / factor, inv)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / hi) * ~(wavelen > old_len / lo)
        return torch.where(medium, smoothed, scaled)
    raise NotImplementedError(f"rope_type {kind!r} is not supported yet")


class RotaryEmbedding(nn.Module):
    """Applies RoPE (neox/HF half-split layout) to flat ``[T, heads*head_dim]`` q and k."""

    def __init__(self, head_dim: int, max_positions: int, params: dict):
        super().__init__()
        self.head_dim = head_dim
        inv = inv_frequencies(params, head_dim)
        freqs = torch.arange(max_positions, dtype=torch.float32, device="cpu")[:, None] * inv[None, :]
        dev = torch.get_default_device()
        self.register_buffer("cos", freqs.cos().to(dev), persistent=False)
        self.register_buffer("sin", freqs.sin().to(dev), persistent=False)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x1, x2 = x.unflatten(-1, (-1, self.head_dim)).chunk(2, dim=-1)  # unflatten: also fine for T = 0
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).view(shape)

    def forward(self, positions: torch.Tensor, q: torch.Tensor,
                k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """New rotated ``(q, k)``, same shapes; q and k may be strided views of the qkv output."""
        if q.is_cuda and triton_ops is not None:
            return triton_ops.rotary(positions, q, k, self.cos, self.sin, self.head_dim)
        return self.forward_torch(positions, q, k)

    def forward_torch(self, positions: torch.Tensor, q: torch.Tensor,
                      k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference: the CPU path, and what the fused kernel is tested against."""
        cos = self.cos[positions].to(q.dtype).unsqueeze(1)
        sin = self.sin[positions].to(q.dtype).unsqueeze(1)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)
