"""The fused mixture-of-experts kernels: routing, token alignment, two grouped GEMMs, the sum.

One MoE step over ``T`` tokens with ``k`` experts each (``T * k`` token-expert pairs):

1. ``fused_route`` (``triton_moe_route.py``): softmax over the router logits, top-k,
   renormalise: one program per token. Up to ``GEMV_MAX_PAIRS`` pairs (decode), two per-pair
   GEMV kernels then do the rest (``triton_moe_gemv.py``); beyond, steps 2-5:
2. ``align`` (``triton_moe_route.py``): the pairs sorted by expert, each expert's run padded to a
   multiple of ``BLOCK_M`` (pad entries point past the last pair), with the expert of every
   ``BLOCK_M`` block and the padded total.
3. ``_gate_up_kernel``: per block of one expert, ``silu(x W_gate^T) * (x W_up^T)`` for its pairs
   (both products in one pass over ``x``; the activation in the epilogue), into ``[T * k, I]``.
4. ``_down_kernel``: per block, ``h W_down^T`` times the pair's routing weight, into ``[T * k, H]``.
5. ``_sum_kernel``: each token's ``k`` rows summed in float32 (pairs with an expert outside
   ``[0, E)`` -- another expert-parallel rank's -- count nothing).

Every size and grid follows from ``T``, ``k``, ``E`` and the block config alone, and every count
stays on the device, so a step is captured in a CUDA graph as it is: blocks past the padded total
(which depends on the routing) exit at once. Block configs come from ``CONFIGS`` (tuned shapes)
or ``default_config``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from treadle.gpu_worker.layers.triton_moe_gemv import fused_moe_gemv
from treadle.gpu_worker.layers.triton_moe_route import align


class MoeConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


# (experts, intermediate per rank, hidden) -> [(up to this many tokens, config), ...] ascending.
# Measured entries only; none yet (docs/moe.md says how to add them).
CONFIGS: dict[tuple[int, int, int], list[tuple[int, MoeConfig]]] = {}
# Pairs up to which the experts run as per-pair GEMVs (triton_moe_gemv.py: batch 1 to 8 at top-8);
# untuned: past it tokens share experts often enough that the tiled GEMMs' one read per expert wins.
GEMV_MAX_PAIRS = 64


def default_config(tokens: int, experts: int, top_k: int) -> MoeConfig:
    """A config for untuned shapes: small ``BLOCK_M`` while most experts see a token or two
    (decode: the products are weight reads), larger tiles once every expert has many rows."""
    rows_per_expert = tokens * top_k / experts
    if rows_per_expert <= 4:
        return MoeConfig(16, 32, 128, 1, 4, 4)
    if rows_per_expert <= 64:
        return MoeConfig(32, 64, 64, 8, 4, 3)
    return MoeConfig(64, 128, 64, 8, 8, 3)


def moe_config(tokens: int, experts: int, inter: int, hidden: int, top_k: int) -> MoeConfig:
    for limit, cfg in CONFIGS.get((experts, inter, hidden), ()):
        if tokens <= limit:
            return cfg
    return default_config(tokens, experts, top_k)


# ------------------------------------------------------------------ grouped GEMMs
@triton.jit
def _block_of(pid, slots, n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of program ``pid``, grouped so neighbours share weight tiles."""
    blocks_m, blocks_n = tl.cdiv(slots, BLOCK_M), tl.cdiv(n, BLOCK_N)
    per_group = GROUP_M * blocks_n
    first_m = pid // per_group * GROUP_M
    group_size = tl.minimum(blocks_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_size, (pid % per_group) // group_size


@triton.jit
def _gate_up_kernel(x, w, out, sorted_ids, expert_ids, num_post, numel, top_k, slots, N, K,
                    stride_xm, stride_we, stride_wn, stride_om,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                    IEEE: tl.constexpr):
    """``out[pair, n] = silu(x[token] . w[e, n]) * (x[token] . w[e, N + n])`` for one block of pairs."""
    pid_m, pid_n = _block_of(tl.program_id(0), slots, N, BLOCK_M, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_post):
        return
    pairs = tl.load(sorted_ids + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    pair_ok = pairs < numel
    tokens = tl.where(pair_ok, pairs // top_k, 0).to(tl.int64)
    e = tl.load(expert_ids + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptr = x + tokens[:, None] * stride_xm + offs_k[None, :]
    g_ptr = w + e * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]
    u_ptr = g_ptr + N * stride_wn
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptr, mask=pair_ok[:, None] & k_ok[None, :], other=0.0)
        g = tl.load(g_ptr, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        u = tl.load(u_ptr, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if IEEE:
            acc_g = tl.dot(a, g, acc_g, input_precision="ieee")
            acc_u = tl.dot(a, u, acc_u, input_precision="ieee")
        else:
            acc_g = tl.dot(a, g, acc_g)
            acc_u = tl.dot(a, u, acc_u)
        a_ptr += BLOCK_K
        g_ptr += BLOCK_K
        u_ptr += BLOCK_K
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    o_ptr = out + pairs.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(o_ptr, h.to(out.dtype.element_ty), mask=pair_ok[:, None] & n_ok[None, :])


@triton.jit
def _down_kernel(h, w, out, topk_weights, sorted_ids, expert_ids, num_post, numel, slots, N, K,
                 stride_hm, stride_we, stride_wn, stride_om,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                 IEEE: tl.constexpr):
    """``out[pair, n] = weight[pair] * (h[pair] . w[e, n])`` for one block of pairs."""
    pid_m, pid_n = _block_of(tl.program_id(0), slots, N, BLOCK_M, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_post):
        return
    pairs = tl.load(sorted_ids + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    pair_ok = pairs < numel
    rows = tl.where(pair_ok, pairs, 0).to(tl.int64)
    e = tl.load(expert_ids + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptr = h + rows[:, None] * stride_hm + offs_k[None, :]
    b_ptr = w + e * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptr, mask=pair_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptr += BLOCK_K
        b_ptr += BLOCK_K
    acc *= tl.load(topk_weights + rows, mask=pair_ok, other=0.0)[:, None]
    o_ptr = out + rows[:, None] * stride_om + offs_n[None, :]
    tl.store(o_ptr, acc.to(out.dtype.element_ty), mask=pair_ok[:, None] & n_ok[None, :])


@triton.jit
def _sum_kernel(rows, ids, out, E, H, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    """``out[t] = sum_j rows[t * k + j]`` over the pairs whose expert is in ``[0, E)``."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        e = tl.load(ids + t * TOP_K + j)
        row = tl.load(rows + (t * TOP_K + j) * H + offs, mask=offs < H, other=0.0).to(tl.float32)
        acc += tl.where((e >= 0) & (e < E), row, 0.0)  # an unwritten row (NaN, say) is never selected
    tl.store(out + t * H + offs, acc.to(out.dtype.element_ty), mask=offs < H)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
              config: Optional[MoeConfig] = None, gemv: Optional[bool] = None) -> torch.Tensor:
    """``layers.moe.moe_torch`` by the fused kernels: ``x [T, H]``, ``w13 [E, 2I, H]``,
    ``w2 [E, H, I]``, routing ``weights``/``ids [T, k]`` (ids outside ``[0, E)`` skipped).
    ``gemv``: per-pair GEMVs (True) or the tiled GEMMs with ``config`` (False); None: GEMVs up to
    ``GEMV_MAX_PAIRS`` pairs when no config is given."""
    t, hidden = x.shape
    experts, inter, k = w13.shape[0], w13.shape[1] // 2, ids.shape[1]
    if t == 0:
        return torch.zeros_like(x)
    if not (x.is_contiguous() and w13.is_contiguous() and w2.is_contiguous()):
        raise ValueError("fused_moe needs contiguous x and expert weights")
    cfg = config or moe_config(t, experts, inter, hidden, k)
    ids = ids.contiguous()
    weights = weights.float().contiguous()
    if gemv or (gemv is None and config is None and t * k <= GEMV_MAX_PAIRS):
        return fused_moe_gemv(x, w13, w2, weights, ids)
    sorted_ids, expert_ids, num_post = align(ids, experts, cfg.block_m)
    slots = sorted_ids.numel()
    ieee = x.dtype == torch.float32
    h = torch.empty(t * k, inter, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(slots, cfg.block_m) * triton.cdiv(inter, cfg.block_n),)
    _gate_up_kernel[grid](x, w13, h, sorted_ids, expert_ids, num_post, t * k, k, slots, inter, hidden,
                          x.stride(0), w13.stride(0), w13.stride(1), h.stride(0),
                          BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                          IEEE=ieee, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    rows = torch.empty(t * k, hidden, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(slots, cfg.block_m) * triton.cdiv(hidden, cfg.block_n),)
    _down_kernel[grid](h, w2, rows, weights, sorted_ids, expert_ids, num_post, t * k, slots, hidden, inter,
                       h.stride(0), w2.stride(0), w2.stride(1), rows.stride(0),
                       BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                       IEEE=ieee, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    out = torch.empty_like(x)
    block_h = min(triton.next_power_of_2(hidden), 1024)
    _sum_kernel[(t, triton.cdiv(hidden, block_h))](rows, ids, out, experts, hidden, TOP_K=k, BLOCK_H=block_h)
    return out
