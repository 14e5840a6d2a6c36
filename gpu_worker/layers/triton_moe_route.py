"""Which expert each token goes to, as the fused MoE (``triton_moe.py``) needs it: its steps 1-2.

- ``fused_route``: softmax over the router logits, top-k, renormalise, in one launch (one program
  per token); the layer calls it for every CUDA MoE step, whichever path the experts then take.
- ``align``: the token-expert pairs sorted by expert, each expert's run padded to a multiple of
  ``BLOCK_M`` (pad entries point past the last pair), with the expert of every ``BLOCK_M`` block and
  the padded total, all on the device (a CUDA graph captures it as it is). One program for up to
  ``ALIGN_ONE_PROGRAM`` pairs, torch ops (a stable sort) beyond. Only the tiled GEMMs read it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Pairs up to which alignment runs as one program, else as torch ops (a sort): every captured decode
# batch (up to 256 tokens with top-8) takes the one launch.
ALIGN_ONE_PROGRAM = 2048


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
