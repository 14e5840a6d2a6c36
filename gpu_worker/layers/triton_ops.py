"""Fused Triton kernels for the per-token layers: RMSNorm (+ residual add), SiLU-and-mul, RoPE,
the KV-cache store (K and V in one launch), and RoPE with the store in one launch.

Each replaces a chain of small torch ops (one launch and one HBM round trip each) with a single
launch that reads its inputs once; at batch-1 decode these layers are pure launch latency. The
layers call in here only for CUDA tensors; their torch code is the reference (and the CPU path).

Numerics follow the torch code: statistics and products in float32, with the same casts to the
activation dtype where the torch code rounds (the normed value before the gain, SiLU before the
mul, the cos/sin table, RoPE's products), so the kernels stay as close to HF's bf16 as the torch
layers are.

The wrappers only allocate outputs and launch: no host syncs and no branches on tensor values,
so they are safe to capture in CUDA graphs. Every kernel handles T = 0 (no launch).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import triton
import triton.language as tl

from treadle.gpu_worker.layers.pdl import pdl_launch, pdl_start, pdl_supported


def _num_warps(block: int) -> int:
    return 4 if block < 2048 else 8 if block < 8192 else 16


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[T, n]`` with unit column stride; any row stride (slices of a wider output) is kept."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


# ---- RMSNorm, optionally fused with the residual add ------------------------------------------

@triton.jit
def _rms_norm_kernel(x_ptr, x_stride, r_ptr, r_stride, out_ptr, res_out_ptr, w_ptr, n, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * r_stride + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * n + cols, x, mask=mask)
    store_rms_norm_row(x, cols, mask, n, eps, w_ptr, out_ptr + row * n)


@triton.jit
def store_rms_norm_row(x, cols, mask, n, eps, w_ptr, out_row_ptr):
    """``norm(x) * w`` of one row ``x`` (in the activation dtype), stored at ``out_row_ptr``;
    shared with the fused all-reduce + norm kernel (``allreduce_norm.py``)."""
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / n + eps)
    y = (xf * rstd).to(x.dtype).to(tl.float32)  # the torch code rounds before the gain
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_row_ptr + cols, y * w, mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None
             ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``RMSNorm.forward``: ``norm(x)``, or ``(norm(x + residual), x + residual)``; inputs untouched."""
    n = x.shape[-1]
    x2 = _rows(x)
    t = x2.shape[0]
    h_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty((t, n), dtype=torch.promote_types(weight.dtype, h_dtype), device=x.device)
    r2 = x2 if residual is None else _rows(residual)
    res_out = out if residual is None else torch.empty((t, n), dtype=h_dtype, device=x.device)
    if t:
        block = triton.next_power_of_2(n)
        _rms_norm_kernel[(t,)](x2, x2.stride(0), r2, r2.stride(0), out, res_out, weight, n, eps,
                               HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=_num_warps(block),
                               **pdl_launch(pdl_supported(x.device)))
    out = out.view(x.shape)
    return out if residual is None else (out, res_out.view(x.shape))


# ---- SiLU-and-mul ------------------------------------------------------------------------------

_ACT_BLOCK = 1024  # columns per program: a 14336-wide MLP gives 14 programs even for one token


@triton.jit
def _silu_and_mul_kernel(x_ptr, x_stride, out_ptr, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + n + cols, mask=mask, other=0.0)
    act = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)  # F.silu's formula, rounded like its output
    tl.store(out_ptr + row * n + cols, act.to(tl.float32) * up.to(tl.float32), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``SiluAndMul.forward``: ``[..., 2I] -> [..., I]`` as ``silu(gate) * up``."""
    n = x.shape[-1] // 2
    x2 = _rows(x)
    t = x2.shape[0]
    out = torch.empty((t, n), dtype=x.dtype, device=x.device)
    if t and n:
        _silu_and_mul_kernel[(t, triton.cdiv(n, _ACT_BLOCK))](x2, x2.stride(0), out, n, BLOCK=_ACT_BLOCK, num_warps=4,
                                                              **pdl_launch(pdl_supported(x.device)))
    return out.view(*x.shape[:-1], n)


# ---- RoPE (neox / rotate-half layout) on q and k -----------------------------------------------

@triton.jit
def _round_bf16(x):
    """float32 ``x`` rounded to bfloat16 precision (nearest-even), still float32. Integer ops: the
    compiler folds a float round trip (``x.to(bf16).to(f32)``) back to ``x``, dropping the rounding."""
    u = x.to(tl.uint32, bitcast=True)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.to(tl.float32, bitcast=True)


@triton.jit
def _to_act(x, BF16: tl.constexpr, like):
    """float32 ``x`` rounded to the activation dtype (that of pointer ``like``), still float32."""
    if BF16:
        return _round_bf16(x)
    return x.to(like.dtype.element_ty).to(tl.float32)


@triton.jit
def _rotate_heads(src, dst, cos, sin, w_ptr, eps, H: tl.constexpr, HALF: tl.constexpr, HEAD: tl.constexpr,
                  PASS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
                  BF16: tl.constexpr, NORM: tl.constexpr):
    """One token's ``H`` heads of ``HEAD`` values: RoPE on the first ``2 * HALF`` of each (the
    halves at ``d`` and ``d + HALF``), the last ``PASS`` copied (partial rotary); with ``NORM``,
    each head RMSNorm-ed first (Qwen3's q/k norm, gain at ``w_ptr``), rounded as the torch code."""
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < H) & (d < HALF)
    off = h * HEAD + d
    x1 = tl.load(src + off, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + off + HALF, mask=mask, other=0.0).to(tl.float32)
    if PASS > 0:
        p = tl.arange(0, BLOCK_P)[None, :]
        pmask = (h < H) & (p < PASS)
        poff = h * HEAD + 2 * HALF + p
        xp = tl.load(src + poff, mask=pmask, other=0.0).to(tl.float32)
    if NORM:
        ss = tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)
        if PASS > 0:
            ss += tl.sum(xp * xp, axis=1)
        rstd = tl.rsqrt(ss / HEAD + eps)[:, None]
        w1 = tl.load(w_ptr + d, mask=d < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + d + HALF, mask=d < HALF, other=0.0).to(tl.float32)
        x1 = _to_act(w1 * _to_act(x1 * rstd, BF16, src), BF16, src)
        x2 = _to_act(w2 * _to_act(x2 * rstd, BF16, src), BF16, src)
        if PASS > 0:
            wp = tl.load(w_ptr + 2 * HALF + p, mask=p < PASS, other=0.0).to(tl.float32)
            xp = _to_act(wp * _to_act(xp * rstd, BF16, src), BF16, src)
    if PASS > 0:
        tl.store(dst + poff, xp, mask=pmask)
    c1, s2, c2, s1 = x1 * cos, x2 * sin, x2 * cos, x1 * sin
    if BF16:
        # Round each product to bf16 as the torch code (and HF) does: a product of two bf16 values
        # is exact in float32, so this gives the same bits as bf16 tensor ops.
        c1, s2, c2, s1 = _round_bf16(c1), _round_bf16(s2), _round_bf16(c2), _round_bf16(s1)
        # Rounded here too: the store's own conversion may truncate (the interpreter's does).
        c1, c2 = _round_bf16(c1 - s2), _round_bf16(c2 + s1)
    else:
        c1, c2 = c1 - s2, c2 + s1
    tl.store(dst + off, c1, mask=mask)
    tl.store(dst + off + HALF, c2, mask=mask)


@triton.jit
def _rope_kernel(pos_ptr, q_ptr, q_stride, k_ptr, k_stride, v_ptr, v_stride, loc_ptr, q_out_ptr, k_out_ptr, v_out_ptr,
                 cos_ptr, sin_ptr, cs_stride, qw_ptr, kw_ptr, eps, QH: tl.constexpr, KH: tl.constexpr,
                 HALF: tl.constexpr, HEAD: tl.constexpr, PASS: tl.constexpr, BLOCK_QH: tl.constexpr,
                 BLOCK_KH: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_V: tl.constexpr,
                 BF16: tl.constexpr, NORM: tl.constexpr, STORE_KV: tl.constexpr, PDL: tl.constexpr):
    pdl_start(PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    cs = pos * cs_stride + d
    cos = tl.load(cos_ptr + cs, mask=d < HALF, other=0.0)
    sin = tl.load(sin_ptr + cs, mask=d < HALF, other=0.0)
    if BF16:  # the torch code casts the table to the activation dtype
        cos, sin = _round_bf16(cos), _round_bf16(sin)
    else:
        dtype = q_out_ptr.dtype.element_ty
        cos, sin = cos.to(dtype).to(tl.float32), sin.to(dtype).to(tl.float32)
    cos, sin = cos[None, :], sin[None, :]
    _rotate_heads(q_ptr + t * q_stride, q_out_ptr + t * (QH * HEAD), cos, sin, qw_ptr, eps, QH, HALF, HEAD, PASS,
                  BLOCK_QH, BLOCK_D, BLOCK_P, BF16, NORM)
    # K goes to its own output row, or (STORE_KV) straight to the token's cache location with V beside it
    k_row = tl.load(loc_ptr + t).to(tl.int64) if STORE_KV else t
    _rotate_heads(k_ptr + t * k_stride, k_out_ptr + k_row * (KH * HEAD), cos, sin, kw_ptr, eps, KH, HALF, HEAD, PASS,
                  BLOCK_KH, BLOCK_D, BLOCK_P, BF16, NORM)
    if STORE_KV:
        h = tl.arange(0, BLOCK_KH)[:, None]
        dd = tl.arange(0, BLOCK_V)[None, :]
        off = h * HEAD + dd
        mask = (h < KH) & (dd < HEAD)
        v = tl.load(v_ptr + t * v_stride + off, mask=mask)
        tl.store(v_out_ptr + k_row * (KH * HEAD) + off, v.to(v_out_ptr.dtype.element_ty), mask=mask)


def _launch_rope(positions: torch.Tensor, q2: torch.Tensor, k2: torch.Tensor, v2: torch.Tensor, loc: torch.Tensor,
                 q_out: torch.Tensor, k_out: torch.Tensor, v_out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 head_dim: int, store_kv: bool, rot_dim: Optional[int], q_weight: Optional[torch.Tensor],
                 k_weight: Optional[torch.Tensor], eps: float) -> None:
    t, qh, kh = q2.shape[0], q2.shape[1] // head_dim, k2.shape[1] // head_dim
    half = (rot_dim or head_dim) // 2
    rest = head_dim - 2 * half
    if not t:
        return
    norm = q_weight is not None
    block_qh, block_d = triton.next_power_of_2(qh), triton.next_power_of_2(half)
    _rope_kernel[(t,)](positions.contiguous(), q2, q2.stride(0), k2, k2.stride(0), v2, v2.stride(0), loc,
                       q_out, k_out, v_out, cos, sin, cos.stride(0), q_weight if norm else cos,
                       k_weight if norm else cos, eps, QH=qh, KH=kh, HALF=half, HEAD=head_dim, PASS=rest,
                       BLOCK_QH=block_qh, BLOCK_KH=triton.next_power_of_2(kh), BLOCK_D=block_d,
                       BLOCK_P=triton.next_power_of_2(max(rest, 1)), BLOCK_V=triton.next_power_of_2(head_dim),
                       BF16=q2.dtype == torch.bfloat16, NORM=norm, STORE_KV=store_kv,
                       num_warps=4 if block_qh * block_d < 4096 else 8, **pdl_launch(pdl_supported(q2.device)))


def rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           head_dim: int, rot_dim: Optional[int] = None, q_weight: Optional[torch.Tensor] = None,
           k_weight: Optional[torch.Tensor] = None, eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``RotaryEmbedding.forward``: new contiguous rotated q and k (the inputs, often strided views
    of the qkv output, are only read). ``cos``/``sin`` are the ``[max_positions, rot_dim/2]`` table;
    ``rot_dim`` (default ``head_dim``): the rotated part of each head (partial rotary); with
    ``q_weight``/``k_weight``, each head is RMSNorm-ed first (``QKNormRotary``)."""
    q2, k2 = _rows(q.flatten(1)), _rows(k.flatten(1))
    q_out, k_out = torch.empty(q2.shape, dtype=q.dtype, device=q.device), torch.empty(k2.shape, dtype=k.dtype, device=k.device)
    _launch_rope(positions, q2, k2, k2, positions, q_out, k_out, k_out, cos, sin, head_dim, False, rot_dim, q_weight,
                 k_weight, eps)
    return q_out.view(q.shape), k_out.view(k.shape)


def rotary_store_kv(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor, head_dim: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    loc: torch.Tensor, rot_dim: Optional[int] = None, q_weight: Optional[torch.Tensor] = None,
                    k_weight: Optional[torch.Tensor] = None, eps: float = 0.0) -> torch.Tensor:
    """``rotary`` and ``store_kv`` in one launch: returns the rotated q; the rotated k and the
    untouched v go only to ``k_cache[loc]``/``v_cache[loc]`` (rounded to the cache dtype), since
    the attention kernels read every position, the new ones included, from the cache."""
    q2, k2, v2 = _rows(q.flatten(1)), _rows(k.flatten(1)), _rows(v.flatten(1))
    q_out = torch.empty(q2.shape, dtype=q.dtype, device=q.device)
    _launch_rope(positions, q2, k2, v2, loc, q_out, k_cache, v_cache, cos, sin, head_dim, True, rot_dim, q_weight,
                 k_weight, eps)
    return q_out.view(q.shape)


# ---- KV-cache store: K and V of the step's tokens in one launch --------------------------------

@triton.jit
def _store_kv_kernel(loc_ptr, k_ptr, k_stride, v_ptr, v_stride, k_cache_ptr, v_cache_ptr, n, BLOCK: tl.constexpr,
                     PDL: tl.constexpr):
    pdl_start(PDL)
    t = tl.program_id(0).to(tl.int64)
    loc = tl.load(loc_ptr + t).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    k = tl.load(k_ptr + t * k_stride + cols, mask=mask)
    v = tl.load(v_ptr + t * v_stride + cols, mask=mask)
    tl.store(k_cache_ptr + loc * n + cols, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + loc * n + cols, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """``k_cache[loc] = k; v_cache[loc] = v`` for ``[N, H, D]`` caches (contiguous) and ``[T, H, D]``
    inputs whose rows may be strided views (v is a slice of the qkv output)."""
    k2, v2 = _rows(k.flatten(1)), _rows(v.flatten(1))
    t, n = k2.shape
    if t:
        block = triton.next_power_of_2(n)
        _store_kv_kernel[(t,)](loc, k2, k2.stride(0), v2, v2.stride(0), k_cache, v_cache, n, BLOCK=block,
                               num_warps=_num_warps(block), **pdl_launch(pdl_supported(k.device)))
