"""Reference packers for 4-bit checkpoints (AWQ "gemm" and GPTQ), written from the formats'
descriptions apart from the loader's code, so tests check one against the other. Each returns
the checkpoint tensors and the float32 ``[out, in]`` weight they stand for."""

from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's "gemm" packing: nibble i of a word holds column 8c + AWQ_ORDER[i]


def _words(v: torch.Tensor) -> torch.Tensor:
    """int64 words 0..2^32-1 -> the int32 a checkpoint stores."""
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


def _pack_cols(v: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """``[r, out]`` ints 0..15 -> ``[r, out/8]`` int32, nibble i holding column 8c + order[i]."""
    words = torch.zeros(v.shape[0], v.shape[1] // 8, dtype=torch.int64)
    for i, col in enumerate(order):
        words |= v[:, col::8].to(torch.int64) << (4 * i)
    return _words(words)


def _pack_rows(v: torch.Tensor) -> torch.Tensor:
    """``[in, out]`` ints 0..15 -> ``[in/8, out]`` int32, nibble i holding row 8r + i."""
    words = torch.zeros(v.shape[0] // 8, v.shape[1], dtype=torch.int64)
    for i in range(8):
        words |= v[i::8].to(torch.int64) << (4 * i)
    return _words(words)


def awq_quantize(w: torch.Tensor, group: int):
    """``w`` [out, in] -> (qweight, qzeros, scales, dequantized [out, in]) in AutoAWQ's gemm layout,
    asymmetric 4-bit per group of ``group`` inputs."""
    wt = w.t().float()  # [in, out]
    n_in, n_out = wt.shape
    g = wt.reshape(n_in // group, group, n_out)
    lo, hi = g.amin(dim=1), g.amax(dim=1)  # [groups, out]
    scales = ((hi - lo).clamp(min=1e-5) / 15).half()
    zeros = torch.clamp(torch.round(-lo / scales.float()), 0, 15).to(torch.int32)
    q = torch.clamp(torch.round(g / scales.float()[:, None]) + zeros[:, None], 0, 15).to(torch.int32).reshape(n_in, n_out)
    deq = ((q.reshape(n_in // group, group, n_out) - zeros[:, None]).float() * scales.float()[:, None]).reshape(n_in, n_out)
    return _pack_cols(q, AWQ_ORDER), _pack_cols(zeros, AWQ_ORDER), scales, deq.t().contiguous()


def gptq_quantize(w: torch.Tensor, group: int, sym: bool = True, desc_act: bool = False, v2: bool = False,
                  seed: int = 0):
    """``w`` [out, in] -> (qweight, qzeros, scales, g_idx, dequantized [out, in]) in GPTQ's layout:
    ``group`` -1 is one group per column; ``desc_act`` quantizes the inputs in a random order
    (``g_idx`` then says each input's group); the ``gptq`` format (``v2`` False) stores zeros
    minus one, so zero points here stay in 1..15."""
    wt = w.t().float()  # [in, out]
    n_in, n_out = wt.shape
    size = n_in if group == -1 else group
    order = torch.randperm(n_in, generator=torch.Generator().manual_seed(seed)) if desc_act else torch.arange(n_in)
    g_idx = torch.empty(n_in, dtype=torch.int32)
    g_idx[order] = (torch.arange(n_in) // size).to(torch.int32)
    groups = n_in // size
    scales, zeros = torch.empty(groups, n_out), torch.empty(groups, n_out, dtype=torch.int32)
    for j in range(groups):
        rows = wt[g_idx == j]
        lo, hi = rows.amin(dim=0), rows.amax(dim=0)
        if sym:
            scales[j] = (torch.maximum(lo.abs(), hi.abs()) * 2 / 15).clamp(min=1e-5)
            zeros[j] = 8
        else:
            scales[j] = ((hi - lo) / 15).clamp(min=1e-5)
            zeros[j] = torch.clamp(torch.round(-lo / scales[j].half().float()), 1, 15).to(torch.int32)
    scales = scales.half()
    s, z = scales.float()[g_idx.long()], zeros[g_idx.long()]
    q = torch.clamp(torch.round(wt / s) + z, 0, 15).to(torch.int32)
    deq = (q - z).float() * s
    stored = zeros if v2 else zeros - 1
    return _pack_rows(q), _pack_cols(stored), scales, g_idx, deq.t().contiguous()
