"""Reference attention backend: gather each row's K/V via req_to_token and run torch SDPA.

Rows with several new tokens (prefill, chunked prefill, extend after a prefix hit) run one
SDPA each with a causal mask offset by the row's cached prefix. Single-token rows (decode) run
together as one padded SDPA. Speculative tree rows (``ctx.tree``) take their own keys and mask.
Slow for big batches but simple and exact; the yardstick for faster backends.

A layer's ``sliding_window`` narrows the masks (built once per step and window, shared by the
layers of that window); a layer's ``logit_cap`` takes the explicit path (scores, cap, mask,
float32 softmax: transformers' eager attention), since SDPA has no soft-capping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from treadle.gpu_worker.attention.base import AttentionBackend
from treadle.gpu_worker.forward_context import ForwardContext

_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)
# cuDNN's SDPA builds a new plan for every new sequence length (~50 ms each on H100), i.e. on
# nearly every step; the flash / memory-efficient kernels have no such cost.
_CUDA_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class _Extend:
    q_start: int
    n: int
    kv_locs: torch.Tensor  # [start+n]
    mask: Optional[torch.Tensor]  # [n, start+n] bool, None when start == 0 (plain causal)
    start: int = 0
    tree: bool = False  # a speculative tree row: ``mask`` is its ancestor mask


@dataclass
class _Decode:
    q_index: torch.Tensor  # [B] token index of each decode row
    kv_locs: torch.Tensor  # [B, max_len], padded with location 0
    mask: torch.Tensor  # [B, 1, 1, max_len] bool
    lens: Optional[torch.Tensor] = None  # [B] positions of each row (the new one included)


@dataclass
class _Meta:
    extends: list[_Extend]
    decode: Optional[_Decode]
    windowed: Optional[dict] = None  # window -> (extend masks, decode mask), built on first use


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: Optional[int]) -> torch.Tensor:
    """``[len(q_pos), len(k_pos)]`` bool: causal, and with ``window`` W only keys at positions
    ``> q - W`` (transformers' ``sliding_window_overlay``: W keys, the query's own included)."""
    mask = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - window
    return mask


def _eager(q, k, v, scale, mask, cap):
    """Attention with soft-capped scores, as transformers' eager attention computes it: scores,
    ``cap * tanh(s / cap)``, mask, float32 softmax. q ``[B, H, n, D]``, k/v ``[B, Hkv, L, D]``,
    mask ``[n, L]`` or ``[B, 1, 1, L]`` bool."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if cap is not None:
        s = torch.tanh(s / cap) * cap
    s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)


def _sdpa(q, k, v, scale, mask=None, causal=False):
    """q ``[B, H, n, D]``, k/v ``[B, Hkv, L, D]``; GQA by native support or by expanding KV heads."""
    gqa = q.shape[1] != k.shape[1]
    if gqa and (not _HAS_GQA or (q.is_cuda and mask is not None)):  # mem-efficient kernel: no GQA
        rep = q.shape[1] // k.shape[1]
        k, v, gqa = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), False
    kw = {"enable_gqa": True} if gqa else {}
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, **kw)
    with sdpa_kernel(_CUDA_KERNELS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, **kw)


class TorchNativeBackend(AttentionBackend):
    supports_tree = True  # speculative tree rows (ForwardContext.tree)

    def __init__(self, **_: object):
        pass

    def init_forward(self, ctx: ForwardContext) -> _Meta:
        dev, r2t = ctx.req_to_token.device, ctx.req_to_token
        extends, dec_rows, dec_q, off = [], [], [], 0
        tree = ctx.tree or {}
        for r, (slot, start, n) in enumerate(zip(ctx.slots, ctx.starts, ctx.extend_lens)):
            if r in tree:  # speculative tree row: the prefix, then its own keys under the ancestor mask
                own, tmask = tree[r]
                mask = torch.cat([torch.ones(n, start, dtype=torch.bool, device=dev), tmask], dim=1)
                extends.append(_Extend(off, n, torch.cat([r2t[slot, :start], own]), mask, start, tree=True))
            elif n == 1:
                dec_rows.append((slot, start + 1))
                dec_q.append(off)
            else:
                mask = None
                if start > 0:
                    kpos = torch.arange(start + n, device=dev)
                    mask = kpos[None, :] <= (start + torch.arange(n, device=dev))[:, None]
                extends.append(_Extend(off, n, r2t[slot, : start + n], mask, start))
            off += n
        decode = None
        if dec_rows:
            slots = torch.tensor([s for s, _ in dec_rows], device=dev)
            lens = torch.tensor([l for _, l in dec_rows], device=dev)
            max_len = max(l for _, l in dec_rows)
            valid = torch.arange(max_len, device=dev)[None, :] < lens[:, None]
            locs = r2t[slots, :max_len].masked_fill(~valid, 0)
            decode = _Decode(torch.tensor(dec_q, device=dev), locs, valid[:, None, None, :], lens)
        return _Meta(extends, decode)

    @staticmethod
    def _masks(meta: _Meta, window: Optional[int]) -> tuple[list[Optional[torch.Tensor]], Optional[torch.Tensor]]:
        """The step's masks for layers of ``window`` (None: the causal ones of ``init_forward``)."""
        if window is None:
            return [e.mask for e in meta.extends], meta.decode.mask if meta.decode is not None else None
        if meta.windowed is None:
            meta.windowed = {}
        if window not in meta.windowed:
            if any(e.tree for e in meta.extends):
                raise NotImplementedError("speculative tree rows with sliding-window layers: the windowed masks "
                                          "assume a chain (use speculative_eagle_topk=1)")
            ext = []
            for e in meta.extends:
                dev = e.kv_locs.device
                ext.append(window_mask(e.start + torch.arange(e.n, device=dev), torch.arange(e.start + e.n, device=dev),
                                       window))
            dec = None
            if meta.decode is not None:
                d = meta.decode
                kpos = torch.arange(d.kv_locs.shape[1], device=d.kv_locs.device)[None, :]
                dec = (d.mask[:, 0, 0] & (kpos >= (d.lens - window)[:, None]))[:, None, None, :]
            meta.windowed[window] = (ext, dec)
        return meta.windowed[window]

    def attend(self, q: torch.Tensor, layer, ctx: ForwardContext) -> torch.Tensor:
        meta: _Meta = ctx.attn_meta
        k_buf, v_buf = ctx.kv_cache.k(layer.layer_id), ctx.kv_cache.v(layer.layer_id)
        window, cap = getattr(layer, "sliding_window", None), getattr(layer, "logit_cap", None)
        ext_masks, dec_mask = self._masks(meta, window)
        out = torch.empty_like(q)
        for e, mask in zip(meta.extends, ext_masks):
            qi = q[e.q_start : e.q_start + e.n].transpose(0, 1)[None]  # [1, H, n, D]
            k = k_buf[e.kv_locs].to(q.dtype).transpose(0, 1)[None]  # widened if the cache is narrower
            v = v_buf[e.kv_locs].to(q.dtype).transpose(0, 1)[None]
            if cap is not None:
                dev = q.device
                mask = mask if mask is not None else window_mask(torch.arange(e.n, device=dev),
                                                                 torch.arange(e.n, device=dev), None)
                o = _eager(qi, k, v, layer.scaling, mask, cap)
            else:
                o = _sdpa(qi, k, v, layer.scaling, mask, causal=mask is None)
            out[e.q_start : e.q_start + e.n] = o[0].transpose(0, 1)
        if meta.decode is not None:
            d = meta.decode
            qd = q[d.q_index].unsqueeze(2)  # [B, H, 1, D]
            k = k_buf[d.kv_locs].to(q.dtype).transpose(1, 2)  # [B, Hkv, L, D]
            v = v_buf[d.kv_locs].to(q.dtype).transpose(1, 2)
            attn = _eager(qd, k, v, layer.scaling, dec_mask, cap) if cap is not None else _sdpa(
                qd, k, v, layer.scaling, dec_mask)
            out[d.q_index] = attn.squeeze(2)
        return out
