"""Triton attention backend: split-KV flash-decoding for decode rows, flash attention for extends.

A step's rows split by their new-token count: single-token rows (decode) go to the decode kernel,
the others (prefill, chunked prefill, extend after a prefix hit) to the extend kernel. Both read
K/V through ``req_to_token`` at arbitrary locations and write disjoint rows of one output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
import triton

from treadle.gpu_worker.attention.base import AttentionBackend
from treadle.gpu_worker.attention.triton_decode import MAX_SPLITS, decode_attention
from treadle.gpu_worker.attention.triton_extend import extend_attention, extend_block_m
from treadle.gpu_worker.host_to_device import to_device_segments
from treadle.gpu_worker.forward_context import ForwardContext

if TYPE_CHECKING:
    from treadle.gpu_worker.layers.attention import Attention

# A decode batch that fills the GPU by itself still splits its long rows: into at most this many
# programs a KV head, each of at least this many positions.
LONG_ROW_SPLITS, LONG_ROW_CHUNK = 4, 512


@dataclass
class DecodeMeta:
    q_idx: torch.Tensor  # [B] int32, token index of each decode row in q
    slots: torch.Tensor  # [B] int32
    seq_lens: torch.Tensor  # [B] int32, start + 1 (the new token's K/V is already stored)
    max_len: int  # host bound on seq_lens; only sizes the split count


@dataclass
class ExtendMeta:
    rows: torch.Tensor  # [4, R] int32: q_start, start, n, slot
    items: torch.Tensor  # [2, I] int32: row, query block
    block_m: int


@dataclass
class TritonMeta:
    decode: Optional[DecodeMeta]
    extend: Optional[ExtendMeta]


class TritonBackend(AttentionBackend):
    """Eager steps: ``init_forward`` builds ``TritonMeta`` from the host lists (one host-to-device
    copy), ``attend`` launches the decode and/or extend kernels.

    CUDA-graph interface (decode-only batches; the runner pads ``bs`` to a captured size):

    - ``init_cuda_graph_state(max_bs, context_len)``: once, allocates the static slot / seq-len /
      token-index buffers that every captured graph reads.
    - ``graph_decode_meta(bs) -> TritonMeta``: metadata over the first ``bs`` rows of those
      buffers; the runner puts it in ``ctx.attn_meta`` at capture and at replay (instead of
      calling ``init_forward``). Row b's query is token b of ``q``.
    - ``fill_graph_decode(bs, slots, seq_lens)``: before each replay, device-to-device copies of
      this step's values (int tensors of length ``bs``; padded rows slot 0, seq_len 1) into the
      static buffers; no host sync.

    The split count of a captured launch depends only on ``bs``, the layer's KV heads and
    ``context_len``, so it is the same at capture and replay. The split scratch is allocated per
    launch: during capture it comes from the graph's private pool, like any activation, and it
    is sized by the layer's head count, which only the layer knows.
    """

    def __init__(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, **_: object):
        self.device, self.dtype = torch.device(device), dtype
        cuda = self.device.type == "cuda"
        self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count if cuda else 4
        self._graph: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
        self._graph_ctx_len = 0

    def init_forward(self, ctx: ForwardContext) -> TritonMeta:
        dec_q, dec_slot, dec_len, rows, items, off = [], [], [], [[], [], [], []], [[], []], 0
        for slot, start, n in zip(ctx.slots, ctx.starts, ctx.extend_lens):
            if n == 1:
                dec_q.append(off), dec_slot.append(slot), dec_len.append(start + 1)
            else:
                for lst, x in zip(rows, (off, start, n, slot)):
                    lst.append(x)
            off += n
        buf = ctx.kv_cache.buf
        block_m = extend_block_m(max(rows[2], default=1), self.dtype, buf.is_cuda)
        for r, n in enumerate(rows[2]):
            for mb in range(triton.cdiv(n, block_m)):
                items[0].append(r), items[1].append(mb)
        nd, nr, ni = len(dec_q), len(rows[0]), len(items[0])
        q_t, slot_t, len_t, rows_t, items_t = to_device_segments(
            [dec_q, dec_slot, dec_len, sum(rows, []), sum(items, [])], torch.int32, ctx.req_to_token.device)
        decode = extend = None
        if nd:
            decode = DecodeMeta(q_t, slot_t, len_t, max(dec_len))
        if nr:
            extend = ExtendMeta(rows_t.view(4, nr), items_t.view(2, ni), block_m)
        return TritonMeta(decode, extend)

    def attend(self, q: torch.Tensor, layer: "Attention", ctx: ForwardContext) -> torch.Tensor:
        meta: TritonMeta = ctx.attn_meta
        k_buf, v_buf = ctx.kv_cache.k(layer.layer_id), ctx.kv_cache.v(layer.layer_id)
        q = q if q.stride(-1) == 1 else q.contiguous()
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if meta.extend is not None:
            e = meta.extend
            extend_attention(q, k_buf, v_buf, out, ctx.req_to_token, e.rows, e.items, layer.scaling, e.block_m,
                             window=layer.sliding_window, logit_cap=layer.logit_cap)
        if meta.decode is not None:
            d = meta.decode
            span = d.max_len if layer.sliding_window is None else min(d.max_len, layer.sliding_window)
            splits, min_chunk = self._num_splits(d.q_idx.shape[0], k_buf.shape[1], span)
            decode_attention(q, k_buf, v_buf, out, ctx.req_to_token, d.q_idx, d.slots, d.seq_lens,
                             layer.scaling, splits, min_chunk, window=layer.sliding_window, logit_cap=layer.logit_cap)
        return out

    def _num_splits(self, bs: int, num_kv_heads: int, max_len: int) -> tuple[int, int]:
        """``(splits, min_chunk)`` of the decode launch. A small batch: enough (row, KV head, split)
        programs to cover the SMs about twice, no split shorter than one 64-token block. A batch
        whose (row, KV head) programs alone cover the SMs twice: up to ``LONG_ROW_SPLITS`` splits,
        used only by rows of more than ``LONG_ROW_CHUNK`` positions, so a long row is not one
        program's tail that the rest of the step waits for."""
        want = triton.cdiv(2 * self.num_sms, bs * num_kv_heads)
        if want > 1:
            return max(1, min(MAX_SPLITS, want, triton.cdiv(max_len, 64))), 64
        return max(1, min(LONG_ROW_SPLITS, triton.cdiv(max_len, LONG_ROW_CHUNK))), LONG_ROW_CHUNK

    # ---- CUDA graphs (decode-only batches) ----

    def init_cuda_graph_state(self, max_bs: int, context_len: int) -> None:
        i32 = dict(dtype=torch.int32, device=self.device)
        self._graph = (torch.arange(max_bs, **i32), torch.zeros(max_bs, **i32), torch.ones(max_bs, **i32))
        self._graph_ctx_len = context_len

    def graph_decode_meta(self, bs: int) -> TritonMeta:
        q_idx, slots, lens = self._graph
        return TritonMeta(DecodeMeta(q_idx[:bs], slots[:bs], lens[:bs], self._graph_ctx_len), None)

    def fill_graph_decode(self, bs: int, slots: torch.Tensor, seq_lens: torch.Tensor) -> None:
        self._graph[1][:bs].copy_(slots, non_blocking=True)
        self._graph[2][:bs].copy_(seq_lens, non_blocking=True)
