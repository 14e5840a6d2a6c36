"""The fused mixture-of-experts kernels: routing, token alignment, two grouped GEMMs, the sum.

One MoE step over ``T`` tokens with ``k`` experts each (``T * k`` token-expert pairs):

1. ``fused_route``: softmax over the router logits, top-k, renormalise: one program per token.
   Up to ``GEMV_MAX_PAIRS`` pairs (decode), two per-pair GEMV kernels then do the rest
   (``triton_moe_gemv.py``); beyond, steps 2-5:
2. ``align``: the pairs sorted by expert, each expert's run padded to a multiple of ``BLOCK_M``
   (pad entries point past the last pair), with the expert of every ``BLOCK_M`` block and the
   padded total. One program for up to 2,048 pairs, torch ops (a stable sort) beyond.
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
# Pairs up to which alignment runs as one program, else as torch ops (a sort): every captured decode
# batch (up to 256 tokens with top-8) takes the one launch.
ALIGN_ONE_PROGRAM = 2048
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


# ------------------------------------------------------------------ routing
@triton.jit
def _route_kernel(logits, weights_out, ids_out, E, stride_l, TOP_K: tl.constexpr, RENORM: tl.constexpr,
                  E_P2: tl.constexpr, K_P2: tl.constexpr):
    """One token's routing: softmax over its ``E`` logits, the ``TOP_K`` largest (renormalised)."""
    t = tl.program_id(0)
    offs = tl.arange(0, E_P2)
    x = tl.load(logits + t * stride_l + offs, mask=offs < E, other=-float("inf")).to(tl.float32)
    p = tl.exp(x - tl.max(x, axis=0))
    p = tl.where(offs < E, p / tl.sum(p, axis=0), -1.0)
    kk = tl.arange(0, K_P2)
    vals = tl.zeros([K_P2], dtype=tl.float32)
    idxs = tl.zeros([K_P2], dtype=tl.int32)
    for j in tl.static_range(TOP_K):  # the largest left, lowest index first among equals
        best = tl.max(p, axis=0)
        idx = tl.min(tl.where(p == best, offs, E_P2), axis=0)
        vals = tl.where(kk == j, best, vals)
        idxs = tl.where(kk == j, idx, idxs)
        p = tl.where(offs == idx, -1.0, p)
    if RENORM:
        vals = vals / tl.sum(vals, axis=0)
    tl.store(weights_out + t * TOP_K + kk, vals, mask=kk < TOP_K)
    tl.store(ids_out + t * TOP_K + kk, idxs, mask=kk < TOP_K)


def fused_route(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``layers.moe.route`` in one launch: ``(weights [T, k] float32, ids [T, k] int32)``."""
    t, e = logits.shape
    weights = torch.empty(t, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(t, top_k, dtype=torch.int32, device=logits.device)
    if t:
        _route_kernel[(t,)](logits, weights, ids, e, logits.stride(0), TOP_K=top_k, RENORM=renormalize,
                            E_P2=triton.next_power_of_2(e), K_P2=max(triton.next_power_of_2(top_k), 2))
    return weights, ids


# ------------------------------------------------------------------ alignment
def padded_size(pairs: int, experts: int, block_m: int) -> int:
    """Slots of the sorted list: every pair plus at most ``block_m - 1`` pad per expert that has a
    pair (at most ``min(experts, pairs)`` of them: a decode step's grid stays small)."""
    return triton.cdiv(pairs + min(experts, pairs) * (block_m - 1), block_m) * block_m


@triton.jit
def _align_kernel(ids, sorted_ids, expert_ids, num_post, numel, E,
                  BLOCK_M: tl.constexpr, E_P2: tl.constexpr, CHUNK: tl.constexpr):
    """``align`` in one program: count the pairs per expert, place each pair after the earlier
    pairs of its expert (chunk by chunk, in pair order), then mark the pads and each block's expert."""
    experts = tl.arange(0, E_P2)
    counts = tl.zeros([E_P2], dtype=tl.int32)
    for c in range(0, numel, CHUNK):  # pass 1: pairs per expert
        offs = c + tl.arange(0, CHUNK)
        e = tl.load(ids + offs, mask=offs < numel, other=-1)
        counts += tl.sum((e[:, None] == experts[None, :]).to(tl.int32), axis=0)
    counts = tl.where(experts < E, counts, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    total = tl.sum(padded, axis=0)
    tl.store(num_post, total)
    seen = tl.zeros([E_P2], dtype=tl.int32)
    for c in range(0, numel, CHUNK):  # pass 2: each pair's slot = its expert's start + pairs before it
        offs = c + tl.arange(0, CHUNK)
        e = tl.load(ids + offs, mask=offs < numel, other=-1)
        hit = ((e[:, None] == experts[None, :]) & (experts[None, :] < E)).to(tl.int32)
        before = tl.cumsum(hit, axis=0) - hit + seen[None, :]
        slot = tl.sum(hit * (starts[None, :] + before), axis=1)
        tl.store(sorted_ids + slot, offs, mask=(offs < numel) & (tl.sum(hit, axis=1) > 0))
        seen += tl.sum(hit, axis=0)
    ends_valid = starts + counts
    for c in range(0, total, CHUNK):  # pads: slots past an expert's pairs (none is read past the total)
        s = c + tl.arange(0, CHUNK)
        owner = tl.sum((ends[None, :] <= s[:, None]).to(tl.int32), axis=1)  # the expert whose run holds s
        end = tl.sum(tl.where(experts[None, :] == owner[:, None], ends_valid[None, :], 0), axis=1)
        tl.store(sorted_ids + s, numel, mask=(s < total) & (s >= end))
        first = s * BLOCK_M  # block s's expert
        block_owner = tl.sum((ends[None, :] <= first[:, None]).to(tl.int32), axis=1)
        tl.store(expert_ids + s, block_owner, mask=first < total)


def _align_torch(ids: torch.Tensor, experts: int, block_m: int, slots: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same as ``_align_kernel`` by torch ops (a stable sort), for many pairs."""
    flat = ids.reshape(-1).long()
    numel, dev = flat.numel(), flat.device
    key = torch.where((flat >= 0) & (flat < experts), flat, experts)
    counts = torch.zeros(experts + 1, dtype=torch.int64, device=dev).scatter_add_(0, key, torch.ones_like(key))
    padded = (counts + block_m - 1) // block_m * block_m
    padded[experts] = 0
    ends = padded.cumsum(0)
    first = counts.cumsum(0) - counts  # where each expert's pairs start in the sorted order
    sorted_key, order = torch.sort(key, stable=True)
    slot = (ends - padded)[sorted_key] + torch.arange(numel, device=dev) - first[sorted_key]
    slot = torch.where(sorted_key < experts, slot, slots)  # other ranks' pairs: to a spare slot
    sorted_ids = torch.full((slots + 1,), numel, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, slot, order.int())
    starts = torch.arange(0, slots, block_m, device=dev)
    block_expert = torch.searchsorted(ends[:experts], starts, right=True)
    expert_ids = torch.where(starts < ends[experts - 1], block_expert, -1).int()
    return sorted_ids[:slots], expert_ids, ends[experts - 1:experts].int()


def align(ids: torch.Tensor, experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sorted_ids [slots] int32, expert_ids [slots / block_m] int32, padded total [1] int32)``
    for expert ids ``[T, k]`` (ids outside ``[0, experts)`` are left out). Only the first ``total``
    slots (and their blocks) are defined: the GEMMs read no further."""
    numel = ids.numel()
    slots = padded_size(numel, experts, block_m)
    if numel > ALIGN_ONE_PROGRAM:
        return _align_torch(ids, experts, block_m, slots)
    sorted_ids = torch.empty(slots, dtype=torch.int32, device=ids.device)
    expert_ids = torch.empty(slots // block_m, dtype=torch.int32, device=ids.device)
    num_post = torch.empty(1, dtype=torch.int32, device=ids.device)
    _align_kernel[(1,)](ids.reshape(-1).int(), sorted_ids, expert_ids, num_post, numel, experts,
                        BLOCK_M=block_m, E_P2=max(triton.next_power_of_2(experts), 16), CHUNK=64, num_warps=8)
    return sorted_ids, expert_ids, num_post


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
