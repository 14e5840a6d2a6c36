"""CUDA attention for ``enable_deterministic_inference``: every row, decode included, through the
extend kernel with one fixed query-block size.

The default backend's results depend on the batch in two ways: a decode row's KV is split into a
number of pieces chosen from the batch size (``TritonBackend._num_splits``), each reduced apart and
then merged, and the extend kernel's query-block size follows the step's longest row
(``extend_block_m``), which changes the tensor-core instruction shape. The extend kernel itself
reads every key through ``req_to_token`` in blocks aligned at position 0 and in order, so a query
sees the same blocks whether its prompt arrived whole, in chunks, or after a cached prefix (blocks
past its position are masked for it and leave its sums unchanged). Here a decode row is an extend
row of one token, ``BLOCK_M`` is fixed, and every key block goes through the kernel's masked loop
(``one_loop``: the unmasked loop over a row's prefix is separate code, whose compiled arithmetic
need not match), so a query's reduction depends only on its request. A windowed layer's loop starts
at the query block's first visible key block: the blocks before it would leave every query's
running max, sum and output exactly at (-inf, 0, 0), so skipping them changes no bit. Decode rows
pay for it: a 1-token row runs a ``BLOCK_M``-row tile and no split of long KV (docs/deterministic.md
has the cost).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton

from treadle.gpu_worker.attention.triton_backend import ExtendMeta, TritonBackend, TritonMeta
from treadle.gpu_worker.attention.triton_extend import extend_attention
from treadle.gpu_worker.forward_context import ForwardContext
from treadle.gpu_worker.host_to_device import to_device_segments

if TYPE_CHECKING:
    from treadle.gpu_worker.layers.attention import Attention

BLOCK_M = 32  # query rows per program, for every step (fp32 and the CPU interpreter use 32 too)


class TritonDeterministicBackend(TritonBackend):
    """``TritonBackend``'s CUDA-graph interface, with decode batches as one-token extend rows:
    static ``rows [4, max_bs]`` (q_start = b, start = seq_len - 1, n = 1, slot) and per-size work
    lists (row b, query block 0) that never change."""

    def init_forward(self, ctx: ForwardContext) -> TritonMeta:
        rows, items, off = [[], [], [], []], [[], []], 0
        for r, (slot, start, n) in enumerate(zip(ctx.slots, ctx.starts, ctx.extend_lens)):
            for lst, x in zip(rows, (off, start, n, slot)):
                lst.append(x)
            for mb in range(triton.cdiv(n, BLOCK_M)):
                items[0].append(r), items[1].append(mb)
            off += n
        nr, ni = len(rows[0]), len(items[0])
        rows_t, items_t = to_device_segments([sum(rows, []), sum(items, [])], torch.int32, ctx.req_to_token.device)
        return TritonMeta(None, ExtendMeta(rows_t.view(4, nr), items_t.view(2, ni), BLOCK_M) if nr else None)

    def attend(self, q: torch.Tensor, layer: "Attention", ctx: ForwardContext) -> torch.Tensor:
        e: ExtendMeta = ctx.attn_meta.extend
        k_buf, v_buf = ctx.kv_cache.k(layer.layer_id), ctx.kv_cache.v(layer.layer_id)
        q = q if q.stride(-1) == 1 else q.contiguous()
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if e is not None:
            extend_attention(q, k_buf, v_buf, out, ctx.req_to_token, e.rows, e.items, layer.scaling, e.block_m,
                             window=layer.sliding_window, logit_cap=layer.logit_cap, one_loop=True)
        return out

    # ---- CUDA graphs (decode-only batches) ----

    def init_cuda_graph_state(self, max_bs: int, context_len: int) -> None:
        i32 = dict(dtype=torch.int32, device=self.device)
        self._rows = torch.stack([torch.arange(max_bs, **i32), torch.zeros(max_bs, **i32),
                                  torch.ones(max_bs, **i32), torch.zeros(max_bs, **i32)])
        self._items: dict[int, torch.Tensor] = {}

    def graph_decode_meta(self, bs: int) -> TritonMeta:
        if bs not in self._items:  # rows b < bs, query block 0; items index the full static rows
            i32 = dict(dtype=torch.int32, device=self.device)
            self._items[bs] = torch.stack([torch.arange(bs, **i32), torch.zeros(bs, **i32)])
        return TritonMeta(None, ExtendMeta(self._rows, self._items[bs], BLOCK_M))

    def fill_graph_decode(self, bs: int, slots: torch.Tensor, seq_lens: torch.Tensor) -> None:
        self._rows[1, :bs].copy_(seq_lens - 1, non_blocking=True)
        self._rows[3, :bs].copy_(slots, non_blocking=True)
