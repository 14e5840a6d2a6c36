"""The 4-bit CUDA-core GEMV for decode (a few rows): ``y = x @ W.T``, W in the K-major layout.

The layout (``triton_int4.py``, ``int4_format.pack_kmajor``): ``w [N, K/8]`` int32, one output's
words contiguous, so a thread streams 16-byte vectors of 4 words along K; nibble ``i`` of such a
block is 4 consecutive inputs (``32b + 4i + j`` in word ``4b + j``), so the activations of a
nibble plane are one 8-byte load, not four. ``scales`` and ``zeros`` are ``[N, K/G]``.

Program ``(n, s)`` takes ``BLOCK_N`` outputs and the ``s``-th slice of K (split-K), a step of
``BLOCK_K`` inputs at a time, the next step's words loaded before this step's arithmetic. The
arithmetic is what bounds a 4-bit GEMV on an H100 (3 TB/s is 6e12 weights a second, and an
int-to-float conversion runs at an eighth of the FMA rate), so a weight costs a shift, an
and/or and one FMA: its nibble is moved into the mantissa of 1.0 (``1 + q/16``, an exact float,
no conversion), multiplied by ``x`` and summed over its group of ``G`` inputs (the tensors keep
the words' own shape, plane by plane: no reshape, no layout change); only then the
group's scale and zero point apply, once per group and output:
``sum (q - z) s x = 16 s * (sum (1 + q/16) x - (1 + z/16) * sum x)``.
Group sizes under 32 or not a power of two dequantize each weight instead (``PER_ELEM``).
Split-K parts meet in a workspace and the last program of a tile adds them up (``finish_tile``):
one launch a layer. With programmatic dependent launch the first step's words are read before
the kernel waits for its predecessor (``pdl.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from treadle.gpu_worker.layers.int4_tiles import MAX_TILES, Tile, split_k
from treadle.gpu_worker.layers.pdl import allow_dependents, gdc_wait, pdl_launch, pdl_supported

_COUNTERS: dict[torch.device, torch.Tensor] = {}
_SMS: dict[int, int] = {}


@triton.jit
def finish_tile(y, out_ptr, ws_ptr, cnt_ptr, tile, pid_k, split, rows, cols, M, N, stride_om):
    """Store a ``[rows, cols]`` tile of partial sums. Split K (``split`` > 1): every split writes
    its part to the workspace ``[split, M, N]``, and the last of them to arrive (a counter per
    tile) adds the parts up in split order, stores the result and resets the counter for the
    next launch: no zero-filled buffer, no atomics on the output, no extra kernels."""
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
def _load_words(w_ptr, rows, row_mask, kw0, kw_end, KW, GT: tl.constexpr, SUBW: tl.constexpr,
                EVEN_K: tl.constexpr):
    """The step's words ``[1, BLOCK_N, GT, SUBW]`` (GT groups of SUBW words; the leading 1 is the
    rows of x, so every tensor of a step is 4-D from its load on and broadcasts only along size-1
    dimensions: no layout conversion). A K mask only where a step may run past the end (else the
    loads stay 16-byte vectors)."""
    col = kw0 + tl.arange(0, GT)[:, None] * SUBW + tl.arange(0, SUBW)[None, :]
    ptrs = (w_ptr + rows[:, None, None].to(tl.int64) * KW + col[None, :, :])[None, :, :, :]
    if EVEN_K:
        return tl.load(ptrs, mask=row_mask[None, :, None, None], other=0, eviction_policy="evict_first")
    mask = row_mask[None, :, None, None] & (col < kw_end)[None, None, :, :]
    return tl.load(ptrs, mask=mask, other=0, eviction_policy="evict_first")


@triton.jit
def _step(acc, w, x_ptr, s_ptr, z_ptr, rows, row_mask, ms, m_mask, kw0, kw_end, KG, stride_xm,
          G: tl.constexpr, HAS_ZERO: tl.constexpr, PER_ELEM: tl.constexpr, EVEN_K: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GT: tl.constexpr, SUB: tl.constexpr):
    """``acc [BLOCK_M, BLOCK_N, GT, SUB/8]`` plus one step's products (``w``: its words), nibble
    plane by nibble plane: plane ``i`` of a 4-word block is 4 consecutive inputs (``pack_kmajor``).
    Sums stay per word position (no reduction until the end); the group's scale and zero point
    apply per word, once for its 8 weights."""
    jj = tl.arange(0, SUB // 8)
    col = kw0 + tl.arange(0, GT)[:, None] * (SUB // 8) + jj[None, :]  # [GT, SUB/8] words
    kb = kw0 * 8 + tl.arange(0, GT)[:, None] * SUB + ((jj // 4) * 32 + jj % 4)[None, :]  # nibble 0's inputs
    xp = x_ptr + ms[:, None, None, None] * stride_xm + kb[None, None, :, :]  # [BLOCK_M, 1, GT, SUB/8]
    if EVEN_K:
        xmask = m_mask[:, None, None, None]
    else:
        xmask = m_mask[:, None, None, None] & (col < kw_end)[None, None, :, :]
    t = tl.zeros((BLOCK_M, BLOCK_N, GT, SUB // 8), dtype=tl.float32)
    xs = tl.zeros((BLOCK_M, 1, GT, SUB // 8), dtype=tl.float32)
    for i in tl.static_range(8):
        f = ((((w >> (4 * i)) & 0xF) << 19) | 0x3F800000).to(tl.float32, bitcast=True)  # 1 + q/16
        x = tl.load(xp + 4 * i, mask=xmask, other=0.0).to(tl.float32)
        if PER_ELEM:  # a group size that steps cannot follow: each weight's own scale and zero point
            grp = rows[None, :, None, None] * KG + ((kb + 4 * i) // G)[None, None, :, :]
            s = tl.load(s_ptr + grp, mask=row_mask[None, :, None, None], other=0.0).to(tl.float32)
            if HAS_ZERO:
                z = tl.load(z_ptr + grp, mask=row_mask[None, :, None, None], other=0).to(tl.float32)
            else:
                z = 8.0
            t += (f - 1.0 - z * 0.0625) * (s * 16.0) * x
        else:
            t += f * x
            xs += x
    if PER_ELEM:
        return acc + t
    grp = rows[None, :, None, None] * KG + ((kw0 * 8 + tl.arange(0, GT) * SUB) // G)[None, None, :, None]
    s = tl.load(s_ptr + grp, mask=row_mask[None, :, None, None], other=0.0).to(tl.float32) * 16.0
    if HAS_ZERO:
        zc = 1.0 + tl.load(z_ptr + grp, mask=row_mask[None, :, None, None], other=0).to(tl.float32) * 0.0625
    else:
        zc = s * 0.0 + 1.5
    return acc + (t - xs * zc) * s


@triton.jit(do_not_specialize=["M", "split"])  # one binary for every batch size
def _fma_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, KW, KG, stride_xm, stride_om, KW_SPLIT,
                split, G: tl.constexpr, HAS_ZERO: tl.constexpr, PER_ELEM: tl.constexpr, EVEN_K: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, GT: tl.constexpr,
                SUB: tl.constexpr, PDL: tl.constexpr):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    ms = tl.arange(0, BLOCK_M)
    m_mask = ms < M
    kw_start = pid_k * KW_SPLIT
    kw_end = tl.minimum(kw_start + KW_SPLIT, KW)
    allow_dependents(PDL)
    w = _load_words(w_ptr, rows, row_mask, kw_start, kw_end, KW, GT, SUB // 8, EVEN_K)
    if PDL:
        gdc_wait()  # the predecessor's writes (our x) are complete and visible from here on
    acc = tl.zeros((BLOCK_M, BLOCK_N, GT, SUB // 8), dtype=tl.float32)
    for kw0 in range(kw_start, kw_end - BLOCK_KW, BLOCK_KW):  # every step but the last
        w_next = _load_words(w_ptr, rows, row_mask, kw0 + BLOCK_KW, kw_end, KW, GT, SUB // 8, EVEN_K)
        acc = _step(acc, w, x_ptr, s_ptr, z_ptr, rows, row_mask, ms, m_mask, kw0, kw_end, KG, stride_xm, G,
                    HAS_ZERO, PER_ELEM, EVEN_K, BLOCK_M, BLOCK_N, GT, SUB)
        w = w_next
    last = kw_start + (kw_end - kw_start - 1) // BLOCK_KW * BLOCK_KW
    acc = _step(acc, w, x_ptr, s_ptr, z_ptr, rows, row_mask, ms, m_mask, last, kw_end, KG, stride_xm, G,
                HAS_ZERO, PER_ELEM, EVEN_K, BLOCK_M, BLOCK_N, GT, SUB)
    y = tl.sum(tl.sum(acc, axis=3), axis=2)
    finish_tile(y, out_ptr, ws_ptr, cnt_ptr, pid_n, pid_k, split, ms, rows, M, N, stride_om)


def sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def outputs(x: torch.Tensor, m: int, n: int, split: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The output, and with split K the partial sums' workspace and the tile counters."""
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if split == 1:
        return out, out, out  # (unused)
    if x.device not in _COUNTERS:
        _COUNTERS[x.device] = torch.zeros(MAX_TILES, dtype=torch.int32, device=x.device)
    return out, torch.empty((split, m, n), dtype=torch.float32, device=x.device), _COUNTERS[x.device]


def group_steps(group: int, k: int, block_k: int) -> tuple[int, int, bool]:
    """``(SUB, GT, PER_ELEM)``: a step of ``block_k`` inputs as GT groups of SUB, or, where the
    groups do not tile it (smaller than a 4-word block, or not a power of two), one span
    dequantized weight by weight."""
    if group >= k or group % block_k == 0:
        return block_k, 1, False
    if block_k % group == 0 and group & (group - 1) == 0 and group >= 32:
        return group, block_k // group, False
    return block_k, 1, True


def splits(tiles: int, steps: int, sms: int, wanted: int) -> int:
    """K parts: ``wanted`` (0: ``split_k``'s), at most one a step, 1 past the counters."""
    split = wanted or split_k(tiles, steps, sms)
    return 1 if tiles > MAX_TILES else max(1, min(split, steps))


def fma_gemv(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group: int,
             tile: Tile, sms: int) -> torch.Tensor:
    """``x [M, K] @ W.T`` on CUDA cores (checked by ``triton_int4.int4_matmul``, which calls this)."""
    m, k = x.shape
    n, kw = w.shape
    block_k = max(32, min(tile.block_k, triton.next_power_of_2(k)))
    bkw = block_k // 8
    sub, gt, per_elem = group_steps(group, k, block_k)
    steps = triton.cdiv(kw, bkw)
    split = splits(triton.cdiv(n, tile.block_n), steps, sms, tile.split)
    kw_split = triton.cdiv(triton.cdiv(kw, split), bkw) * bkw
    split = triton.cdiv(kw, kw_split)
    out, ws, cnt = outputs(x, m, n, split)
    _fma_kernel[(triton.cdiv(n, tile.block_n), split)](
        x, w, scales, scales if zeros is None else zeros, out, ws, cnt, m, n, kw, scales.shape[1], x.stride(0),
        out.stride(0), kw_split, split, G=group, HAS_ZERO=zeros is not None, PER_ELEM=per_elem,
        EVEN_K=kw % bkw == 0, BLOCK_M=triton.next_power_of_2(m), BLOCK_N=tile.block_n, BLOCK_KW=bkw, GT=gt, SUB=sub,
        num_warps=tile.warps, num_stages=1, **pdl_launch(x.is_cuda and pdl_supported(x.device)))
    return out
