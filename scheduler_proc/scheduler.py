"""The scheduler's core: admit requests, build one forward plan per step, apply its results.

Continuous batching: every step runs the decode token of each running request plus the
prefill of newly admitted ones in one plan, so requests join and leave the batch at any
step. KV pages are reserved for a request's whole budget at admission (prompt plus
``max_new_tokens``), so a running request never runs out of pages.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any, Optional

from treadle.runtime.messages import (
    FinishReason, ForwardPlan, NewSlot, PlanRow, RowOut, TokenizedReq, TokenOut,
)
from treadle.runtime.server_args import ServerArgs
from treadle.scheduler_proc.kv_pool import PageAllocator, SlotAllocator
from treadle.scheduler_proc.req import Req
from treadle.scheduler_proc.stop_checker import check_finish, ends_with_stop_prefix

logger = logging.getLogger("treadle.scheduler")


class Scheduler:
    def __init__(self, args: ServerArgs, tokenizer: Any, eos_ids: set[int], worker_info: dict[str, Any],
                 hidden_size: int = 0) -> None:
        self.args = args
        self.hidden_size = hidden_size
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.context_len: int = worker_info["context_len"]
        self.max_total_tokens: int = worker_info["kv_tokens"]
        self.max_running: int = worker_info["max_slots"]
        self.vocab_size: int = worker_info.get("vocab_size", 1 << 62)
        self.page_size: int = args.page_size or 1
        self.pages = PageAllocator(self.max_total_tokens, self.page_size)
        self.slots = SlotAllocator(self.max_running)
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.step = 0
        self.plan_reqs: list[Req] = []  # the request of each row of the plan in flight
        self.plan_prefill: list[bool] = []  # whether that row is the request's prefill
        self.outputs: list[TokenOut] = []
        self.num_generated = 0
        self.last_log = time.monotonic()

    # ------------------------------------------------------------------ intake
    def add_requests(self, reqs: list[TokenizedReq]) -> list[tuple[str, str]]:
        """Queue requests; returns (rid, message) for those that can never fit the KV pool."""
        rejected = []
        pool = self.pages.num_pages * self.page_size
        for tr in reqs:
            if len(tr.input_ids) + 1 > pool:
                rejected.append((tr.rid, (
                    f"Input length ({len(tr.input_ids)} tokens) exceeds the KV cache capacity "
                    f"({self.max_total_tokens} tokens). Use a shorter input or a larger max_total_tokens."
                )))
                continue
            # max_new_tokens is clamped to what the context and the KV pool can hold (API.md 4.1)
            room = min(self.context_len, pool) - len(tr.input_ids)
            max_new = room if tr.sampling.max_new_tokens is None else min(tr.sampling.max_new_tokens, room)
            req = Req(tr, max_new, self.eos_ids, self.hidden_size)
            if self.args.log_requests:
                logger.info("receive rid=%s prompt_tokens=%d max_new_tokens=%d", tr.rid, len(tr.input_ids), max_new)
            if max_new == 0:
                req.finish = FinishReason(type="length", length=0)
                self._emit(req)
                continue
            self.waiting.append(req)
        return rejected

    def abort(self, rid: str, abort_all: bool) -> None:
        """Abort by rid prefix (SGLang's rule, so ``rid`` also aborts ``rid_0``, ``rid_1``...)."""
        match = (lambda r: True) if abort_all else (lambda r: r.rid == rid or r.rid.startswith(rid + "_"))
        for req in [r for r in self.waiting if match(r)]:
            self.waiting.remove(req)
            req.finish = FinishReason(type="abort", message="Abort in waiting queue")
            self._emit(req)
        for req in self.running:
            if match(req) and req.finish is None:
                req.finish = FinishReason(type="abort", message="Aborted")
        self._release_finished()

    # ------------------------------------------------------------------ planning
    def schedule(self) -> Optional[ForwardPlan]:
        """The next step's plan: one decode row per running request plus admitted prefills."""
        rows: list[PlanRow] = []
        new_slots: list[NewSlot] = []
        self.plan_reqs, self.plan_prefill = [], []
        for req in self.running:
            pos = req.seq_len - 1
            rows.append(PlanRow(req.slot, [req.all_ids()[-1]], pos, req.locs(pos, pos + 1, self.page_size)))
            self.plan_reqs.append(req)
            self.plan_prefill.append(False)
        budget = self.args.max_prefill_tokens
        while self.waiting and self.slots.free_slots > 0:
            req = self.waiting[0]
            need = self.pages.pages_for(len(req.input_ids) + req.max_new_tokens)
            if need > self.pages.free_pages or (len(req.input_ids) > budget and budget < self.args.max_prefill_tokens):
                break
            self.waiting.popleft()
            budget -= len(req.input_ids)
            req.pages = self.pages.alloc(need)
            req.slot = self.slots.alloc()
            new_slots.append(NewSlot(req.slot, req.sampling_spec(self.vocab_size), list(req.output_ids)))
            ids = req.all_ids()  # a re-queued request re-runs its output so far too
            logprob_from = -1 if req.input_logprobs_done else req.tr.logprob_start_len
            rows.append(PlanRow(req.slot, ids, 0, req.locs(0, len(ids), self.page_size), True, logprob_from))
            self.running.append(req)
            self.plan_reqs.append(req)
            self.plan_prefill.append(True)
        if not rows:
            return None
        self.step += 1
        return ForwardPlan(step=self.step, new_slots=new_slots, rows=rows)

    # ------------------------------------------------------------------ results
    def apply_result(self, next_token_ids: list[int], extras: Optional[dict[int, RowOut]] = None) -> None:
        extras = extras or {}
        # Every row samples (no chunked rows yet), so row index i is also the index of its token.
        for i, (req, prefill, tok) in enumerate(zip(self.plan_reqs, self.plan_prefill, next_token_ids)):
            if req.finish is not None:  # aborted while the step ran
                continue
            req.num_computed = req.seq_len
            if i in extras and req.meta is not None:
                self._record_meta(req, prefill, tok, extras[i])
            req.output_ids.append(tok)
            check_finish(req, self.tokenizer)
            if req.finish is not None or self._should_stream(req):
                self._emit(req)
        self.num_generated += len(next_token_ids)
        self._release_finished()
        self._maybe_log()

    def _record_meta(self, req: Req, prefill: bool, tok: int, extra: RowOut) -> None:
        if prefill and not req.input_logprobs_done:
            req.meta.add_input(req.input_ids, req.tr.logprob_start_len, extra)
            req.input_logprobs_done = True
        if req.tr.return_logprob:
            req.meta.add_output(tok, extra)
        if req.tr.return_hidden_states and extra.hidden:
            req.meta.add_hidden(extra, prefill and not req.hidden_prefill_done)
            req.hidden_prefill_done = True

    def _should_stream(self, req: Req) -> bool:
        if not req.tr.stream:
            return False
        k = req.sampling.stream_interval or self.args.stream_interval
        n = len(req.output_ids)
        due = req.sent < n if k == 1 else (n - req.sent) >= k or req.sent == 0
        return due and not ends_with_stop_prefix(req, self.tokenizer)

    def _emit(self, req: Req) -> None:
        s = req.sampling
        fin = req.finish
        first = req.sent == 0
        self.outputs.append(TokenOut(
            rid=req.rid, new_ids=req.output_ids[req.sent:], finish=fin,
            prompt_tokens=len(req.input_ids), completion_tokens=len(req.output_ids),
            cached_tokens=req.cached_tokens, context_ids=req.context_ids() if first else [],
            skip_special_tokens=s.skip_special_tokens, spaces_between_special_tokens=s.spaces_between_special_tokens,
            trim_stop_str=fin.matched if fin is not None and isinstance(fin.matched, str) and not s.no_stop_trim else None,
            trim_last_token=fin is not None and isinstance(fin.matched, int) and not s.no_stop_trim,
            meta=req.meta.delta() if req.meta is not None else None,
        ))
        req.sent = len(req.output_ids)

    def _release_finished(self) -> None:
        keep = []
        for req in self.running:
            if req.finish is None:
                keep.append(req)
                continue
            if req.sent < len(req.output_ids) or req.finish.type == "abort":
                self._emit(req)
            if self.args.log_requests:
                logger.info("finish rid=%s completion_tokens=%d reason=%s", req.rid, len(req.output_ids), req.finish.to_json())
            self.pages.free(req.pages)
            self.slots.free(req.slot)
            req.pages, req.slot = [], None
        self.running = keep

    def take_outputs(self) -> list[TokenOut]:
        out, self.outputs = self.outputs, []
        return out

    # ------------------------------------------------------------------ introspection
    def is_idle(self) -> bool:
        return not self.running and not self.waiting

    def check_integrity(self) -> None:
        """At idle every page and slot is free (a leak check, run by tests and at idle)."""
        if self.is_idle():
            assert self.pages.free_pages == self.pages.num_pages, "KV page leak"
            assert self.slots.free_slots == self.slots.num_slots, "request slot leak"

    def internal_state(self) -> dict[str, Any]:
        return {
            "max_total_tokens": self.max_total_tokens, "max_running_requests": self.max_running,
            "context_length": self.context_len, "page_size": self.page_size,
            "num_running": len(self.running), "num_waiting": len(self.waiting),
            "free_pages": self.pages.free_pages, "num_pages": self.pages.num_pages,
            "free_slots": self.slots.free_slots, "step": self.step,
        }

    def _maybe_log(self) -> None:
        now = time.monotonic()
        if now - self.last_log >= 5.0 and self.running:
            tput = self.num_generated / (now - self.last_log)
            logger.info("decode: #running-req %d, #waiting %d, gen throughput %.1f tok/s",
                        len(self.running), len(self.waiting), tput)
            self.num_generated, self.last_log = 0, now
