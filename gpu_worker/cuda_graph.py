"""CUDA graphs for decode steps: one graph per padded batch size, captured once at start-up.

A decode step of a small model is a few hundred tiny kernels; launching them one by one costs
more than running them. A graph replays the whole forward (embedding, layers, final norm, LM
head) with one launch. Graphs read their inputs from static buffers, so a step copies its token
ids, positions, KV locations and slots into the first ``bs`` columns, pads the rest up to the
next captured size with a harmless row (token 0 at position 0 of the spare slot, writing the
spare KV location), and replays. Sampling stays outside the graph (it varies by request).
"""

from __future__ import annotations

import bisect
import logging
from typing import TYPE_CHECKING, Optional

import torch

from treadle.gpu_worker.forward_context import ForwardContext, forward_context

if TYPE_CHECKING:
    from treadle.gpu_worker.model_runner import ModelRunner

logger = logging.getLogger("treadle.worker")


def capture_sizes(max_bs: int) -> list[int]:
    """Batch sizes to capture: dense where batches are common (small), sparser above."""
    sizes = [1, 2, 4, 8, 12, 16, 24] + list(range(32, 129, 16)) + list(range(160, 1025, 32))
    return sorted({s for s in sizes if s < max_bs} | {max_bs})


class DecodeGraphs:
    def __init__(self, runner: "ModelRunner", max_bs: int) -> None:
        self.runner = runner
        self.sizes = capture_sizes(max_bs)
        self.max_bs = self.sizes[-1]
        dev = runner.device
        spare_slot, spare_loc = runner.cfg.max_slots, runner.cfg.kv_tokens
        # Rows: token id, position, KV location, slot; padding columns hold the spare row.
        self.pad = torch.tensor([0, 0, spare_loc, spare_slot], dtype=torch.int64, device=dev)[:, None].expand(4, self.max_bs).contiguous()
        self.static = self.pad.clone()
        backend = runner.attn_backend
        backend.init_cuda_graph_state(self.max_bs, runner.cfg.context_len)
        # LoRA: each row's adapter slot (-1: base model), read by the captured mask computation.
        self.lora_slots = runner.lora.graph_buffers(self.max_bs) if runner.lora is not None else None
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        logger.info("capturing CUDA graphs for decode batch sizes %s", self.sizes)
        pool = None
        for bs in reversed(self.sizes):  # largest first: the smaller ones reuse its memory pool
            ctx = self._context(bs)
            with forward_context(ctx):
                for _ in range(2):  # warm up (autotuning, lazy allocations) outside the graph
                    self._lora_mask(bs)
                    runner.model.compute_logits(runner.model(ctx.input_ids))
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._lora_mask(bs)
                    hidden = runner.model(ctx.input_ids)
                    logits = runner.model.compute_logits(hidden)
            pool = graph.pool()
            self.graphs[bs] = (graph, hidden, logits)
        torch.cuda.synchronize()

    def _lora_mask(self, bs: int) -> None:
        if self.lora_slots is not None:
            self.runner.lora.graph_mask(bs)

    def _context(self, bs: int) -> ForwardContext:
        r, st = self.runner, self.static
        backend = r.attn_backend
        self._fill_attention(bs)
        ctx = ForwardContext(
            input_ids=st[0, :bs], positions=st[1, :bs], out_cache_loc=st[2, :bs], slots=[], starts=[],
            extend_lens=[], logits_indices=torch.empty(0), req_to_token=r.req_to_token, kv_cache=r.kv_cache,
            attn_backend=backend)
        ctx.attn_meta = backend.graph_decode_meta(bs)
        return ctx

    def _fill_attention(self, bs: int) -> None:
        """The attention backend's static metadata from the first ``bs`` columns (seq_len = position + 1)."""
        self.runner.attn_backend.fill_graph_decode(bs, self.static[3, :bs], self.static[1, :bs] + 1)

    def fits(self, bs: int) -> bool:
        return bs <= self.max_bs

    def replay(self, input_ids: torch.Tensor, positions: torch.Tensor, locs: torch.Tensor,
               slots: torch.Tensor, lora_slots: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the graph of the smallest captured size >= ``bs``; (hidden, logits) of the real rows
        (views of the graph's output buffers, valid until the next replay). ``lora_slots``: each
        row's LoRA adapter slot, with LoRA enabled."""
        bs = input_ids.shape[0]
        pbs = self.sizes[bisect.bisect_left(self.sizes, bs)]
        st = self.static
        if pbs > bs:
            st[:, bs:pbs].copy_(self.pad[:, bs:pbs])
        st[:, :bs].copy_(torch.stack([input_ids, positions, locs, slots]))
        self._fill_attention(pbs)
        if self.lora_slots is not None:  # padding rows: the base model
            self.lora_slots[bs:pbs].fill_(-1)
            self.lora_slots[:bs].copy_(lora_slots)
        graph, hidden, logits = self.graphs[pbs]
        graph.replay()
        return hidden[:bs], logits[:bs]
