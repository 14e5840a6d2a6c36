"""CPU attention for ``enable_deterministic_inference``: a query's output is computed the same way
alone or in any batch, in a decode step or in any chunk of a prefill, with or without a cached prefix.

``torch_native`` runs one SDPA per extend row and a padded SDPA over the decode rows, so a query's
reduction order depends on its row's length and on the longest row of the step. Here every query
is placed by its absolute position: query tile ``p // Q_TILE`` of its row, place ``p % Q_TILE``
in it, and keys are read in tiles ``[j * KV_TILE, (j + 1) * KV_TILE)`` from position 0, the same
for every query, with an online softmax across tiles in key order. Each (query tile, KV head, key
tile) step is one fixed-shape item of a batched GEMM (the query heads of a KV head stacked as
rows), so a query's scores and sums do not depend on the other items. Tiles past a query's own
position are all masked for it and change nothing (``exp(-inf) = 0``, ``alpha = 1``).
Every row of the step (prefill, chunk, decode) goes through the same code.

A layer's ``sliding_window`` W only narrows the mask (keys ``> p - W``, as ``torch_native``); the
key tiles stay the same, from position 0. A tile wholly before a query's window finds it with no
key seen yet (max -inf): the offset is taken as 0 then, so the tile leaves the state at exactly
(-inf, 0, 0), as if the query had started at its first visible tile. A layer's ``logit_cap`` c
gives scores ``c * tanh(s / c)`` (torch's CPU ``tanh``, like its ``exp``, computes every element on
one vector path, unlike its ``silu`` and ``sigmoid``: an element alone and inside a tensor agree).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from treadle.gpu_worker.attention.base import AttentionBackend
from treadle.gpu_worker.forward_context import ForwardContext

Q_TILE, KV_TILE = 4, 64  # a decode row pays for Q_TILE places


@dataclass
class _Meta:
    q_index: torch.Tensor  # [NQ, Q_TILE] token index in q of each tile place (0 for padding)
    q_valid: torch.Tensor  # [NQ, Q_TILE] bool: a real query of the step
    kv_locs: torch.Tensor  # [NQ, J * KV_TILE] KV location of each key position (0 past the row's keys)
    bias: torch.Tensor  # [NQ, 1, Q_TILE, J * KV_TILE] 0 where a place sees a key, -inf elsewhere
    order: list[int]  # number of query tiles that need key tile j (tiles sorted by need, descending)
    qpos: torch.Tensor  # [NQ, Q_TILE] position of each place
    windowed: dict[int, torch.Tensor] = field(default_factory=dict)  # window -> its bias, built on first use

    def bias_for(self, window: Optional[int]) -> torch.Tensor:
        """The step's bias for layers of ``window`` (None: the causal one): the causal bias, and -inf
        for keys at positions ``<= p - window`` (built once per step and window, shared by its layers)."""
        if window is None:
            return self.bias
        if window not in self.windowed:
            kpos = torch.arange(self.bias.shape[-1], device=self.bias.device)
            old = kpos[None, None, :] <= self.qpos[:, :, None] - window
            self.windowed[window] = self.bias.masked_fill(old[:, None], float("-inf"))
        return self.windowed[window]



class TorchDeterministicBackend(AttentionBackend):
    def __init__(self, **_: object):
        pass

    def init_forward(self, ctx: ForwardContext) -> _Meta:
        tiles = []  # (slot, tile start position, first token index, first valid place, count, keys)
        off = 0
        for slot, start, n in zip(ctx.slots, ctx.starts, ctx.extend_lens):
            p = start
            while p < start + n:
                t0 = p // Q_TILE * Q_TILE
                end = min(t0 + Q_TILE, start + n)
                tiles.append((slot, t0, off + p - start, p - t0, end - p, end))
                p = end
            off += n
        tiles.sort(key=lambda t: -t[5])  # longest key range first: tile j's users are a prefix
        nq = len(tiles)
        places = torch.arange(Q_TILE)
        idx = torch.zeros(nq, Q_TILE, dtype=torch.int64)
        valid = torch.zeros(nq, Q_TILE, dtype=torch.bool)
        t0s = torch.tensor([t[1] for t in tiles], dtype=torch.int64)
        for i, (_, _, first, at, count, _) in enumerate(tiles):
            idx[i, at:at + count] = torch.arange(first, first + count)
            valid[i, at:at + count] = True
        keys = [t[5] for t in tiles]
        jmax = -(-max(keys) // KV_TILE)
        kpos = torch.arange(jmax * KV_TILE)
        kv_valid = kpos[None, :] < torch.tensor(keys)[:, None]
        r2t = ctx.req_to_token
        cols = kpos.clamp(max=r2t.shape[1] - 1).to(r2t.device)
        slots = torch.tensor([t[0] for t in tiles], device=r2t.device)
        dev = r2t.device
        locs = r2t[slots[:, None], cols[None, :]].masked_fill(~kv_valid.to(dev), 0)
        order = [sum(1 for k in keys if k > j * KV_TILE) for j in range(jmax)]
        # A place sees the keys up to its own position (padding places too: key 0 at least, so no
        # row is all -inf); computed once per step, added to every layer's scores (adding 0 is exact).
        qpos = t0s[:, None] + places[None, :]
        seen = (kpos[None, None, :] <= qpos[:, :, None]) & kv_valid[:, None, :]
        bias = torch.zeros(seen.shape).masked_fill_(~seen, float("-inf"))[:, None]
        return _Meta(idx.to(dev), valid.to(dev), locs, bias.to(dev), order, qpos.to(dev))

    def attend(self, q: torch.Tensor, layer, ctx: ForwardContext) -> torch.Tensor:
        meta: _Meta = ctx.attn_meta
        k_buf, v_buf = ctx.kv_cache.k(layer.layer_id), ctx.kv_cache.v(layer.layer_id)
        nq = meta.q_index.shape[0]
        _, h, d = q.shape
        hkv = k_buf.shape[1]
        g = h // hkv
        # [NQ, Q_TILE, H, D] -> [NQ * Hkv, G * Q_TILE, D]: a KV head's query heads stacked as GEMM rows
        qt = (q[meta.q_index] * (meta.q_valid[:, :, None, None] * layer.scaling)).view(nq, Q_TILE, hkv, g, d)
        qt = qt.permute(0, 2, 3, 1, 4).reshape(nq * hkv, g * Q_TILE, d)
        m = torch.full((nq * hkv, g * Q_TILE, 1), float("-inf"), dtype=torch.float32, device=q.device)
        l = torch.zeros_like(m)
        acc = torch.zeros(nq * hkv, g * Q_TILE, d, dtype=torch.float32, device=q.device)
        window, cap = getattr(layer, "sliding_window", None), getattr(layer, "logit_cap", None)
        bias = meta.bias_for(window)
        for j, users in enumerate(meta.order):
            a, b = j * KV_TILE, (j + 1) * KV_TILE
            rows = users * hkv  # query tiles 0..users-1 need this key tile (for the rest it is all masked)
            locs = meta.kv_locs[:users, a:b]
            k = k_buf[locs].to(q.dtype).permute(0, 2, 3, 1).reshape(rows, d, KV_TILE)  # [users*Hkv, D, KV]
            v = v_buf[locs].to(q.dtype).permute(0, 2, 1, 3).reshape(rows, KV_TILE, d)
            s = torch.bmm(qt[:rows], k).float()
            if cap is not None:
                s = torch.tanh(s / cap) * cap
            s = (s.view(users, hkv, g, Q_TILE, KV_TILE) + bias[:users, :, None, :, a:b]).view(rows, g * Q_TILE, KV_TILE)
            m_old = m[:rows]
            m_new = torch.maximum(m_old, s.amax(-1, keepdim=True))  # finite without a window: all see key 0
            m_use = m_new if window is None else m_new.masked_fill(m_new == float("-inf"), 0.0)
            alpha = torch.exp(m_old - m_use)
            p = torch.exp(s - m_use)
            l[:rows] = l[:rows] * alpha + p.sum(-1, keepdim=True)
            acc[:rows] = acc[:rows] * alpha + torch.bmm(p.to(v.dtype), v).float()
            m[:rows] = m_new
        if window is not None:  # a padding place past its row's keys may see none (l = 0); it is dropped
            l = l.masked_fill(l == 0, 1.0)
        out_t = (acc / l).to(q.dtype).view(nq, hkv, g, Q_TILE, d).permute(0, 3, 1, 2, 4)
        out = torch.empty_like(q)
        out[meta.q_index[meta.q_valid]] = out_t.reshape(nq, Q_TILE, h, d)[meta.q_valid]
        return out
