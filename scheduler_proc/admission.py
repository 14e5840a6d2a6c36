"""Admission: which waiting requests start running, and the prefill rows of the running ones.

Waiting requests are taken in the policy's order (``policy.order_waiting``), each starting after
its longest cached prefix, while the step's prefill token budget, the request slots and the KV
pages last: a request is admitted only if its pages fit beside what the running requests are
expected to still need (``KvBudget.decode_reserve``). A prompt longer than the budget is chunked
over steps, one chunked request at a time.
"""

from __future__ import annotations

import random
import time
from typing import Any, Optional

from treadle.runtime.messages import FinishReason, NewSlot, PlanRow, PrefixWrite
from treadle.runtime.server_args import ServerArgs
from treadle.scheduler_proc.lora_slots import LoraSlots
from treadle.scheduler_proc.memory import KvBudget
from treadle.scheduler_proc.outputs import Outputs
from treadle.scheduler_proc.plan import StepDraft
from treadle.scheduler_proc.policy import order_waiting, priority_of
from treadle.scheduler_proc.req import Req


class Admission:
    """Moves requests from ``waiting`` to ``running`` (the scheduler's lists, changed in place)."""

    def __init__(self, args: ServerArgs, kv: KvBudget, lora: LoraSlots, outputs: Outputs, waiting: list[Req],
                 running: list[Req], stats: dict[str, int], vocab_size: int, priority: bool) -> None:
        self.kv = kv
        self.lora = lora
        self.outputs = outputs
        self.waiting = waiting
        self.running = running
        self.stats = stats
        self.vocab_size = vocab_size
        self.priority = priority
        self.policy = args.schedule_policy
        self.max_queued: Optional[int] = args.max_queued_requests
        self.rng = random.Random(args.random_seed)  # schedule_policy="random"
        cps = args.chunked_prefill_size
        self.chunk_size: Optional[int] = cps if cps is not None and cps > 0 else None
        self.step_prefill_tokens = min(args.max_prefill_tokens, self.chunk_size or args.max_prefill_tokens)
        # enable_pdmux: beside decode rows a step prefills at most this many tokens (0: no bound)
        self.pdmux_tokens = min(args.pdmux_prefill_tokens, self.step_prefill_tokens) if args.enable_pdmux else 0

    def step_budget(self, decoding: bool) -> int:
        """The prefill tokens of the step being planned: ``step_prefill_tokens``, or with ``enable_pdmux``
        and decode rows in the step ``pdmux_prefill_tokens``: the worker overlaps the prefill with the
        decode rows, which helps only while the two take about as long (gpu_worker/pdmux.py)."""
        return self.pdmux_tokens if decoding and self.pdmux_tokens else self.step_prefill_tokens

    def queue_has_room(self, req: Req) -> bool:
        """``max_queued_requests``: with priorities, a more important newcomer displaces the least
        important waiting request (newest on ties), which is aborted as overloaded."""
        if self.max_queued is None or len(self.waiting) < self.max_queued:
            return True
        if not self.priority:
            return False
        victim = min(self.waiting, key=lambda r: (priority_of(r), -r.arrival))
        if priority_of(req) <= priority_of(victim):
            return False
        self.waiting.remove(victim)
        self.outputs.finish_unrun(victim, FinishReason(
            type="abort", message="The request is aborted by a higher priority request.", status_code=503))
        return True

    def admit(self, draft: StepDraft, token_budget: int) -> int:
        """Start waiting requests with prefill rows in ``draft``, within ``token_budget`` prefill
        tokens; returns the budget left."""
        started = draft.has_prefill()  # prefill work already in this step
        for req in order_waiting(self.waiting, self.policy, self.priority, lambda r: self.match(r, r.key_ids()),
                                 self.rng):
            if req.grammar is not None and not req.grammar.ready:
                continue  # still compiling: others go ahead
            if self.kv.slots.free_slots == 0:
                break
            ids = req.key_ids()
            pages, node = self.match(req, ids)
            matched = len(pages) * self.kv.page_size
            want = len(ids) - matched
            # input logprobs and embeddings come from one whole prefill row (never chunked)
            unchunked = req.wants_input_logprobs or req.tokenized.embed or self.chunk_size is None
            if unchunked and want > token_budget and started:
                break  # over the step's budget: it runs whole in a later step (alone if need be)
            n = want if unchunked else min(want, token_budget)
            with self.kv.hold(node):
                if not self._fits(req, len(pages), matched, n, want):
                    break
                if req.tokenized.lora_name is not None:
                    slot = self.lora.acquire(req.tokenized.lora_name)
                    if slot is None:  # every device slot serves running requests of other adapters
                        continue
                    req.lora_slot = slot
                # the request takes its own lock before the hold ends: the node is never unlocked in between
                self._start(req, pages, node, len(ids), draft)
            token_budget -= self.prefill_row(req, n, draft)
            started = True
            if token_budget <= 0 or n < want:  # one chunked request at a time
                break
        return token_budget

    def _fits(self, req: Req, num_cached_pages: int, matched: int, n: int, want: int) -> bool:
        """The pages of ``req``'s first ``n`` new tokens fit beside the decode reserve."""
        need = self.kv.pages.pages_for(matched + n) - num_cached_pages
        later = 0
        if self.kv.reserves_exact_peak(req):  # a request of certain length must find room for its later chunks too
            later = self.kv.pages.pages_for(matched + want) - num_cached_pages - need
        return need + later <= self.kv.available_pages() - self.kv.decode_reserve(self.running, req)

    def _start(self, req: Req, pages: list[int], node: Any, prefill_end: int, draft: StepDraft) -> None:
        """Move ``req`` to ``running`` with a slot and its cached prefix (``node`` locked for it)."""
        self.waiting.remove(req)
        req.t_admitted = req.t_admitted or time.monotonic()  # a retracted request keeps its first admission
        req.slot = self.kv.slots.alloc()
        self.kv.cache.lock(node)
        matched = len(pages) * self.kv.page_size
        req.pages, req.shared_pages, req.cache_node = list(pages), len(pages), node
        req.num_computed, req.prefill_end = matched, prefill_end
        if req.num_retractions == 0:
            req.cached_tokens = matched
            self.stats["prompt_tokens"] += prefill_end
            self.stats["cached_tokens"] += matched
        draft.new_slots.append(NewSlot(req.slot, req.sampling_spec(self.vocab_size), list(req.output_ids)))
        if matched:
            draft.prefix_writes.append(PrefixWrite(req.slot, req.locs(0, matched, self.kv.page_size)))
        self.running.append(req)

    def prefill_row(self, req: Req, token_budget: int, draft: StepDraft) -> int:
        """Add the next prefill chunk of ``req`` to ``draft`` (at most ``token_budget`` tokens, and no
        more than the free pages hold: decodes took theirs first); returns its size."""
        start = req.num_computed
        room = (len(req.pages) + self.kv.available_pages()) * self.kv.page_size - start
        n = min(req.prefill_end - start, token_budget, room)
        if n <= 0:
            return 0
        self.kv.grow(req, start + n)
        done = start + n == req.prefill_end
        lp_from = -1
        if not req.input_logprobs_done and req.wants_input_logprobs:
            lp_from = max(0, req.tokenized.logprob_start_len - start)
        ids = req.all_ids()[start:start + n]
        samples = done and not req.tokenized.embed
        row = PlanRow(req.slot, ids, start, req.locs(start, start + n, self.kv.page_size), samples, lp_from,
                      lora_slot=req.lora_slot, mm=req.mm_chunks(start, start + n) if req.mm_items else [])
        draft.add(req, row, n, samples, prefill=True)
        req.t_launched = req.t_launched or time.monotonic()  # its first chunk's step is being planned
        return n

    def match(self, req: Req, ids: list[int]) -> tuple[list[int], Any]:
        """The cached prefix to reuse: at most len - 1 tokens (one must run to sample), and not past
        ``logprob_start_len`` when input logprobs are wanted."""
        cap = len(ids) - 1
        if req.wants_input_logprobs and not req.input_logprobs_done:
            cap = min(cap, req.tokenized.logprob_start_len)
        return self.kv.cache.match_prefix(ids, max_len=cap, namespace=req.cache_namespace)
