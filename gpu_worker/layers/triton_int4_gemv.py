"""The 4-bit GEMV for decode (M <= 4 rows): ``y = x @ W.T`` with W packed as in ``triton_int4``.

No tensor cores: program ``(n, s)`` takes ``BLOCK_N`` outputs and the ``s``-th slice of K
(split-K, so a narrow layer still fills the GPU). For each of the 8 nibbles of a word it
multiplies the nibble plane ``[BLOCK_KW, BLOCK_N]`` by the inputs ``8r + i``, keeping ``sum(q x)``
and ``sum(x)`` apart, so ``(. - z * .) * s`` costs once per word, not once per weight; where a
group spans the whole tile (group 128, 16 word rows) the scales and zero points are one row a
step. The next step's words are loaded before this step's arithmetic (two tiles in flight), and
with programmatic dependent launch (Hopper) the first tile is loaded before the kernel waits for
its predecessor's output (``pdl.py``; only the weight, scales and zeros, which no kernel writes,
are read before the wait). Split-K parts meet in a workspace, and the last program of a tile to
finish adds them up (``finish_tile``): one launch a layer, no zero-filled buffer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from treadle.gpu_worker.layers.pdl import allow_dependents, gdc_wait, pdl_launch, pdl_supported

MAX_TILES = 8192  # split-K counters a device keeps (each launch resets those it used)
_COUNTERS: dict[torch.device, torch.Tensor] = {}
_SMS: dict[int, int] = {}


@dataclass(frozen=True)
class GemvLaunch:
    """The GEMV's tiles: ``block_n`` outputs x ``block_kw`` word rows (8 inputs each) a step,
    ``warps`` a program, and K split until about ``per_sm`` programs run on each SM."""

    block_n: int = 64
    block_kw: int = 16
    warps: int = 4
    per_sm: int = 4


GEMV = GemvLaunch()


@triton.jit
def finish_tile(y, out_ptr, ws_ptr, cnt_ptr, tile, pid_k, split, rows, cols, M, N, stride_om):
    """Store a ``[rows, cols]`` tile of partial sums. Split K (``split`` > 1): every split writes
    its part to the workspace ``[split, M, N]``, and the last of them to arrive (a counter per
    tile) adds the parts up in split order, stores the result and resets the counter for the
    next launch: no zero-filled buffer, no atomics on the output, no extra kernels (each costs
    ~2 us a layer at batch 1, also inside a CUDA graph)."""
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    if split == 1:
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        offs = rows[:, None] * N + cols[None, :]
        tl.store(ws_ptr + pid_k * M * N + offs, y, mask=mask)
        tl.debug_barrier()  # every thread's part is written before the counter says so
        if tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel") == split - 1:
            total = tl.zeros(y.shape, dtype=tl.float32)
            for s in range(0, split):
                total += tl.load(ws_ptr + s * M * N + offs, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(cnt_ptr + tile, 0)


@triton.jit
def _load_step(w_ptr, s_ptr, z_ptr, kw0, kw_end, cols, col_mask, N, G: tl.constexpr, HAS_ZERO: tl.constexpr,
               BLOCK_KW: tl.constexpr):
    """The words, scales and zero points of the step at word row ``kw0`` (all masked off past
    ``kw_end``: the prefetch after the last step reads nothing)."""
    r = kw0 + tl.arange(0, BLOCK_KW)
    wmask = (r < kw_end)[:, None] & col_mask[None, :]
    w = tl.load(w_ptr + r[:, None].to(tl.int64) * N + cols[None, :], mask=wmask, other=0, eviction_policy="evict_first")
    if G % (BLOCK_KW * 8) == 0:  # one group for the whole step (steps start at multiples of BLOCK_KW)
        g = (kw0 * 8) // G
        smask = col_mask & (kw0 + cols * 0 < kw_end)  # (a vector: the interpreter takes no scalar mask)
        s = tl.load(s_ptr + g * N + cols, mask=smask, other=0.0).to(tl.float32)[None, None, :]
        if HAS_ZERO:
            z = tl.load(z_ptr + g * N + cols, mask=smask, other=0).to(tl.float32)[None, None, :]
        else:
            z = s * 0.0 + 8.0
    else:
        grp = (r[:, None] * 8) // G * N + cols[None, :]
        s = tl.load(s_ptr + grp, mask=wmask, other=0.0).to(tl.float32)[None, :, :]
        if HAS_ZERO:
            z = tl.load(z_ptr + grp, mask=wmask, other=0).to(tl.float32)[None, :, :]
        else:
            z = s * 0.0 + 8.0
    return w, s, z


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, KW, stride_xm, stride_om, KW_SPLIT,
                 split, G: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_KW: tl.constexpr, PDL: tl.constexpr):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    ms = tl.arange(0, BLOCK_M)
    m_mask = ms < M
    kw_start = pid_k * KW_SPLIT
    kw_end = tl.minimum(kw_start + KW_SPLIT, KW)
    allow_dependents(PDL)
    w, s, z = _load_step(w_ptr, s_ptr, z_ptr, kw_start, kw_end, cols, col_mask, N, G, HAS_ZERO, BLOCK_KW)
    if PDL:
        gdc_wait()  # the predecessor's writes (our x) are complete and visible from here on
    acc = tl.zeros((BLOCK_M, BLOCK_KW, BLOCK_N), dtype=tl.float32)
    for kw0 in range(kw_start, kw_end, BLOCK_KW):
        w_next, s_next, z_next = _load_step(w_ptr, s_ptr, z_ptr, kw0 + BLOCK_KW, kw_end, cols, col_mask, N, G,
                                            HAS_ZERO, BLOCK_KW)
        r = kw0 + tl.arange(0, BLOCK_KW)
        xmask = m_mask[:, None] & (r < kw_end)[None, :]
        t = tl.zeros((BLOCK_M, BLOCK_KW, BLOCK_N), dtype=tl.float32)
        xs = tl.zeros((BLOCK_M, BLOCK_KW), dtype=tl.float32)
        for i in tl.static_range(8):
            xi = tl.load(x_ptr + ms[:, None] * stride_xm + r[None, :] * 8 + i, mask=xmask, other=0.0).to(tl.float32)
            t += xi[:, :, None] * ((w >> (4 * i)) & 0xF).to(tl.float32)[None, :, :]
            xs += xi
        acc += (t - xs[:, :, None] * z) * s
        w, s, z = w_next, s_next, z_next
    finish_tile(tl.sum(acc, axis=1), out_ptr, ws_ptr, cnt_ptr, pid_n, pid_k, split, ms, cols, M, N, stride_om)


def sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def split_k(tiles: int, steps: int, sms: int, per_sm: int = 4) -> int:
    """Split K in as many parts as it takes for ``per_sm`` programs an SM, each keeping >= 2 K
    steps (1 where the tiles would overrun the counters)."""
    if tiles > MAX_TILES:
        return 1
    return max(1, min(-(-per_sm * sms // tiles), steps // 2))


def outputs(x: torch.Tensor, m: int, n: int, split: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The output, and with split K the partial sums' workspace and the tile counters."""
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if split == 1:
        return out, out, out  # (unused)
    if x.device not in _COUNTERS:
        _COUNTERS[x.device] = torch.zeros(MAX_TILES, dtype=torch.int32, device=x.device)
    return out, torch.empty((split, m, n), dtype=torch.float32, device=x.device), _COUNTERS[x.device]


def int4_gemv(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], group: int,
              sms: int, launch: Optional[GemvLaunch] = None) -> torch.Tensor:
    """``x [M <= 4, K] @ W.T`` (checked by ``triton_int4.int4_matmul``, which calls this)."""
    g = launch or GEMV
    m, k = x.shape
    n, kw = w.shape[1], k // 8
    split = split_k(triton.cdiv(n, g.block_n), triton.cdiv(kw, g.block_kw), sms, g.per_sm)
    kw_split = triton.cdiv(triton.cdiv(kw, split), g.block_kw) * g.block_kw
    split = triton.cdiv(kw, kw_split)
    out, ws, cnt = outputs(x, m, n, split)
    _gemv_kernel[(triton.cdiv(n, g.block_n), split)](
        x, w, scales, scales if zeros is None else zeros, out, ws, cnt, m, n, kw, x.stride(0), out.stride(0),
        kw_split, split, G=group, HAS_ZERO=zeros is not None, BLOCK_M=triton.next_power_of_2(m), BLOCK_N=g.block_n,
        BLOCK_KW=g.block_kw, num_warps=g.warps, **pdl_launch(x.is_cuda and pdl_supported(x.device)))
    return out
