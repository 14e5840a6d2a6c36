"""Rotary position embedding as a cos/sin table: default, linear, Llama-3, YaRN, dynamic NTK and
LongRoPE scaling, and partial rotary (only the first ``rot_dim`` of each head turns).

The table has one row per position of the req-to-token table (``max_positions``), computed in
float32 on the CPU exactly like HF computes it on the fly (YaRN's and LongRoPE's attention factor
included), then cast to the activation dtype when applied. Only half the rotary dim is stored:
the two halves share frequencies.

HF's ``dynamic`` and ``longrope`` types choose their frequencies per forward call from the
longest position in the batch; a static table cannot. Within the model's trained length (what
the context is capped at by default) both are exactly HF's. Past it, each row here holds what
HF uses for a sequence ending at that position: LongRoPE's long factors from
``original_max_position_embeddings`` on, dynamic NTK's base for ``seq_len = position + 1``. So a
token decoded past the limit matches HF's cached generate, while HF rotates a long *prompt*'s
every position (and LongRoPE's earlier ones too) with the frequencies of its last position.
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
    """The rope dict with ``rope_type``, ``rope_theta``, ``partial_rotary_factor`` and the
    position limits the scaled types need, for transformers 5 and older configs."""
    params = getattr(config, "rope_parameters", None)
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params = dict(params)
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    params.setdefault("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0)
    outside = getattr(config, "original_max_position_embeddings", None)  # where Phi-3 keeps it
    if params.get("original_max_position_embeddings") is None and outside:
        params["original_max_position_embeddings"] = outside
    params["max_position_embeddings"] = getattr(config, "max_position_embeddings", None)
    return params


def rotary_dim(params: dict, head_dim: int) -> int:
    return int(head_dim * params.get("partial_rotary_factor", 1.0))


def _base_inv(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _yarn(params: dict, dim: int) -> tuple[torch.Tensor, float]:
    """HF's ``_compute_yarn_parameters``: interpolated low frequencies, extrapolated high ones,
    a linear ramp between, and the attention factor (``mscale``) for cos/sin."""
    base, factor = float(params["rope_theta"]), params.get("factor")
    orig = params.get("original_max_position_embeddings") or params["max_position_embeddings"]
    if factor is None:
        factor = params["max_position_embeddings"] / orig
    attention = params.get("attention_factor")
    mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention is None:
        attention = (float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all)) if mscale and mscale_all
                     else get_mscale(factor))
    beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as HF: no division by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, attention


def inv_frequencies(params: dict, rot_dim: int) -> torch.Tensor:
    """The inverse frequencies of the types whose table is one set for every position."""
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


def rope_table(params: dict, rot_dim: int, max_positions: int) -> tuple[torch.Tensor, float]:
    """``(freqs [max_positions, rot_dim/2], attention factor)``: each row the angles of a position."""
    kind = params["rope_type"]
    pos = torch.arange(max_positions, dtype=torch.float32, device="cpu")[:, None]
    if kind == "yarn":
        inv, attention = _yarn(params, rot_dim)
        return pos * inv[None, :], attention
    if kind == "longrope":
        orig = params["original_max_position_embeddings"]
        factor = params.get("factor") or params["max_position_embeddings"] / orig
        attention = params.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
        base = float(params["rope_theta"])
        short, long = (1.0 / (torch.tensor(params[f], dtype=torch.float32) * base ** (
            torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim)) for f in ("short_factor", "long_factor"))
        inv = torch.where(pos >= orig, long[None, :], short[None, :])  # HF: long once seq_len > orig
        return pos * inv, attention
    if kind == "dynamic":
        base, factor, limit = float(params["rope_theta"]), params["factor"], params["max_position_embeddings"]
        inv = _base_inv(base, rot_dim)[None, :].repeat(max_positions, 1)
        if max_positions > limit:  # HF's base for a sequence of p + 1 positions, each row p past the limit
            p = torch.arange(limit, max_positions, dtype=torch.float64)
            bases = base * ((factor * (p + 1) / limit) - (factor - 1)) ** (rot_dim / (rot_dim - 2))
            exps = torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim
            inv[limit:] = 1.0 / (bases.float()[:, None] ** exps[None, :])
        return pos * inv, 1.0
    return pos * inv_frequencies(params, rot_dim)[None, :], 1.0


class RotaryEmbedding(nn.Module):
    """Applies RoPE (neox/HF half-split layout) to flat ``[T, heads*head_dim]`` q and k; with
    partial rotary (Phi-4-mini) only the first ``rot_dim`` of each head turns."""

    def __init__(self, head_dim: int, max_positions: int, params: dict):
        super().__init__()
        self.head_dim = head_dim
        self.rot_dim = rotary_dim(params, head_dim)
        dev = torch.get_default_device()
        with torch.device("cpu"):  # the table in float32 on the host (a model is built under a CUDA default device)
            freqs, attention = rope_table(params, self.rot_dim, max_positions)
        self.register_buffer("cos", (freqs.cos() * attention).to(dev), persistent=False)
        self.register_buffer("sin", (freqs.sin() * attention).to(dev), persistent=False)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        heads = x.unflatten(-1, (-1, self.head_dim))  # unflatten: also fine for T = 0
        rot, rest = heads[..., :self.rot_dim], heads[..., self.rot_dim:]
        x1, x2 = rot.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1).view(shape)

    def forward(self, positions: torch.Tensor, q: torch.Tensor,
                k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """New rotated ``(q, k)``, same shapes; q and k may be strided views of the qkv output."""
        if q.is_cuda and triton_ops is not None:
            return triton_ops.rotary(positions, q, k, self.cos, self.sin, self.head_dim, self.rot_dim)
        return self.forward_torch(positions, q, k)

    def rotate_and_store_cuda(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              k_cache: torch.Tensor, v_cache: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
        """``KVCache.rotate_and_store`` on CUDA: one launch; returns the rotated q."""
        return triton_ops.rotary_store_kv(positions, q, k, v, self.cos, self.sin, self.head_dim, k_cache, v_cache,
                                          loc, self.rot_dim)

    def forward_torch(self, positions: torch.Tensor, q: torch.Tensor,
                      k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference: the CPU path, and what the fused kernel is tested against."""
        cos = self.cos[positions].to(q.dtype).unsqueeze(1)
        sin = self.sin[positions].to(q.dtype).unsqueeze(1)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)


class QKNormRotary(nn.Module):
    """Qwen3's RMSNorm over each head of q and k, then RoPE: where the attention applies the
    rotary, so on CUDA the norms ride in the RoPE kernel (no launches of their own). The norms
    are the attention layer's (their weights load under its names); only referenced here."""

    def __init__(self, rotary: RotaryEmbedding, q_norm: nn.Module, k_norm: nn.Module):
        super().__init__()
        self.rotary = rotary
        self.norms = (q_norm, k_norm)  # a tuple: not submodules, so no second name for their weights
        self.head_dim, self.rot_dim = rotary.head_dim, rotary.rot_dim

    def forward(self, positions: torch.Tensor, q: torch.Tensor,
                k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if q.is_cuda and triton_ops is not None:
            (qn, kn), r = self.norms, self.rotary
            return triton_ops.rotary(positions, q, k, r.cos, r.sin, self.head_dim, self.rot_dim, qn.weight, kn.weight,
                                     qn.eps)
        return self.forward_torch(positions, q, k)

    def forward_torch(self, positions: torch.Tensor, q: torch.Tensor,
                      k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        qn, kn = self.norms
        hd = self.head_dim
        q = qn.forward_torch(q.reshape(-1, hd)).view(q.shape)  # rows of one head each: [T * heads, head_dim]
        k = kn.forward_torch(k.reshape(-1, hd)).view(k.shape)
        return self.rotary.forward_torch(positions, q, k)

    def rotate_and_store_cuda(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              k_cache: torch.Tensor, v_cache: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
        (qn, kn), r = self.norms, self.rotary
        return triton_ops.rotary_store_kv(positions, q, k, v, r.cos, r.sin, self.head_dim, k_cache, v_cache, loc,
                                          self.rot_dim, qn.weight, kn.weight, qn.eps)
