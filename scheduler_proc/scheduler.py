"""The scheduler's core: admit requests, build one forward plan per step, apply its results.

Continuous batching: every step runs the decode token of each running request, then prefill
work within a token budget (the rest of a chunked prompt first, then newly admitted requests,
each starting after its longest cached prefix). A prompt longer than ``chunked_prefill_size``
is split over steps, so decodes never wait for more than one chunk. Pages are taken as tokens
need them; when decoding runs out, the least advanced requests are retracted to the queue and
later recomputed (their KV stays in the prefix cache until evicted).

The ``Scheduler`` keeps the loop-facing surface and hands the rest to the collaborators it owns:
``KvBudget`` (memory.py: pages, slots, prefix cache, the decode reserve), ``Admission``
(admission.py), ``Retraction`` (retraction.py), ``StepResults`` (step_results.py: a step's
result into its requests), ``Outputs`` (outputs.py) and ``Sessions`` (sessions.py). They share
the ``waiting`` and ``running`` lists, changed in place, never rebound.
"""

from __future__ import annotations

import collections
import itertools
import time
from typing import Any, Callable, Optional

from treadle.runtime.messages import (
    PLACEHOLDER, FinishReason, ForwardPlan, MmItem, PlanRow, RowOut, TokenizedReq, TokenOut, WorkerInfo,
)
from treadle.runtime.server_args import ServerArgs
from treadle.scheduler_proc.admission import Admission
from treadle.scheduler_proc.grammar import GrammarManager
from treadle.scheduler_proc.lora_slots import LoraSlots
from treadle.scheduler_proc.memory import KvBudget
from treadle.scheduler_proc.outputs import Outputs
from treadle.scheduler_proc.plan import PlannedRow, PlannedStep, StepDraft, continues_prefill, decodes_now
from treadle.scheduler_proc.req import Req
from treadle.scheduler_proc.retraction import Retraction
from treadle.scheduler_proc.sessions import Sessions
from treadle.scheduler_proc.spec_sched import Speculation
from treadle.scheduler_proc.step_results import StepResults


RELEASED_MESSAGE = ("The engine's memory ({}) is released (release_memory_occupation): call "
                    "resume_memory_occupation() before sending requests.")


class Scheduler:
    """One scheduler per DP rank: its loop (``main.SchedulerLoop``) feeds it requests and step
    results and sends the plans it makes and the outputs it collects."""

    def __init__(self, args: ServerArgs, tokenizer: Any, eos_ids: set[int], worker: WorkerInfo,
                 hidden_size: int = 0, tokenizer_dir: Optional[str] = None) -> None:
        self.args = args
        self.hidden_size = hidden_size
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.context_len = worker.context_len
        self.max_total_tokens = worker.kv_tokens
        self.max_running = worker.max_slots
        self.vocab_size = worker.vocab_size
        is_encoder = worker.is_encoder  # bidirectional: no prefix can be reused
        self.lora = LoraSlots(args.max_loras_per_batch if args.enable_lora else 0, args.lora_eviction_policy)
        self.kv = KvBudget(args, self.max_total_tokens, self.max_running, self.lora,
                           prefix_caching=not (args.disable_radix_cache or is_encoder))
        # the budget's parts, as internal_state, main.py's integrity check and the tests read them
        self.pages, self.slots, self.cache = self.kv.pages, self.kv.slots, self.kv.cache
        self.page_size = self.kv.page_size
        self.priority = args.enable_priority_scheduling or args.schedule_policy == "priority"
        # Pipeline parallelism: up to pp_size steps in flight over disjoint requests (micro-batches),
        # each holding at most its share of the running requests, so every stage has work.
        self.micro_batches = args.pp_size
        self.pipelined = self.micro_batches > 1
        self.max_plans_in_flight = args.pp_size if args.pp_size > 1 else (1 if args.disable_overlap_schedule else 2)
        self.plans_in_flight: collections.deque[PlannedStep] = collections.deque()  # results not applied yet
        self.admission_paused = False  # a weight update waits for the running requests: none is admitted
        self.released: set[str] = set()  # memory tags given back (release_memory_occupation): requests refused
        self.plan_rows: list[PlannedRow] = []  # the latest plan's rows, as its ForwardPlan.rows
        self.step = 0
        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.arrivals = itertools.count()
        self.stats = {"prompt_tokens": 0, "cached_tokens": 0, "retractions": 0, "preemptions": 0,
                      "max_prefill_tokens_beside_decode": 0, "max_step_prefill_tokens": 0,
                      "last_step_ms": 0, "longest_step_ms": 0}  # step times: measured by main.SchedulerLoop
        self.grammars = GrammarManager(args.grammar_backend or "xgrammar", tokenizer_dir, self.vocab_size, eos_ids,
                                       args.trust_remote_code)
        self.sessions = Sessions(self.cache)
        normalize = worker.normalize and not is_encoder
        self.outputs = Outputs(args, tokenizer, self.kv, self.sessions, self.running, normalize)
        self.outputs.pooled_normalized = worker.normalize
        self.admission = Admission(args, self.kv, self.lora, self.outputs, self.waiting, self.running, self.stats,
                                   self.vocab_size, self.priority)
        self.spec = Speculation(args, self.kv, self.context_len) if args.speculative_algorithm else None
        self.retraction = Retraction(self.kv, self.outputs, self.waiting, self.running, self.stats, self.pipelined,
                                     self.priority)
        self.results = StepResults(self.outputs, self.grammars, self.spec, tokenizer)

    # ------------------------------------------------------------------ intake
    def add_requests(self, reqs: list[TokenizedReq]) -> list[tuple[str, str, str]]:
        """Queue requests; returns ``(rid, error kind, message)`` for those refused."""
        rejected = []
        pool = self.pages.num_pages * self.page_size
        for tokenized in reqs:
            if self.released:
                rejected.append((tokenized.rid, "runtime", RELEASED_MESSAGE.format(", ".join(sorted(self.released)))))
                continue
            try:
                ids, items, grammar_key = self._checked_input(tokenized, pool)
            except ValueError as e:
                rejected.append((tokenized.rid, "value", str(e)))
                continue
            # max_new_tokens is clamped to what the context and the KV pool can hold (API.md 4.1)
            room = min(self.context_len, pool) - len(ids)
            asked = tokenized.sampling.max_new_tokens
            max_new = room if asked is None else min(asked, room)
            if tokenized.embed:
                max_new = 0  # prefill only; the result is an embedding
            req = Req(tokenized, max_new, self.eos_ids, self.hidden_size)
            req.input_ids, req.arrival, req.mm_items = ids, next(self.arrivals), items
            if self.spec is not None:
                req.spec_counts = [0, 0, 0]
            if not self.admission.queue_has_room(req):
                rejected.append((tokenized.rid, "overloaded", "The request queue is full."))
                continue
            if tokenized.session is not None:
                deleted = self.sessions.table.begin(tokenized.session, tokenized.rid, ids, items)
                if deleted:  # turns of the branch ``replace`` cut off that still run or wait
                    self._abort_where(lambda r: r.rid in deleted, f"Aborted: a replace=True turn of session "
                                      f"{tokenized.session.id} deleted this turn")
            if self.args.log_requests:
                self.outputs.log_request("receive", req, ids)
            if max_new == 0 and not tokenized.embed:
                self.outputs.finish_unrun(req, FinishReason(type="length", length=0))
                continue
            if grammar_key is not None:  # compiles off the loop; admitted once compiled (see Admission.admit)
                self.grammars.attach(req, grammar_key)
            req.t_queued = time.monotonic()
            self.waiting.append(req)
        return rejected

    def _checked_input(self, tokenized: TokenizedReq, pool: int) -> tuple[list[int], list[MmItem], Any]:
        """The full input of a request and its images (a session turn's include its context), and its
        grammar key; raises ValueError for a request that can never run."""
        grammar_key = self.grammars.key_of(tokenized.sampling)
        if tokenized.lora_name is not None and not self.lora.serves(tokenized.lora_name):
            raise ValueError(f"Got LoRA adapter that has never been loaded: {tokenized.lora_name}")
        ids, items = tokenized.input_ids, tokenized.mm_items
        if tokenized.session is not None:
            ids, items = self.sessions.table.context(tokenized.session, tokenized.rid, ids, items)
            # the tokenizer saw only the new text: a turn's logprob_start_len counts its whole context
            if tokenized.return_logprob and tokenized.logprob_start_len > len(ids):
                raise ValueError(f"logprob_start_len ({tokenized.logprob_start_len}) is larger than the prompt "
                                 f"length ({len(ids)}: the session turn's whole context, earlier turns included).")
        if len(ids) + 1 > pool:
            raise ValueError(f"Input length ({len(ids)} tokens) exceeds the KV cache capacity "
                             f"({self.max_total_tokens} tokens). Use a shorter input or a larger max_total_tokens.")
        if len(ids) >= self.context_len + tokenized.embed:  # an embedding may fill the context
            raise ValueError(f"The input ({len(ids)} tokens) is longer than the model's context length "
                             f"({self.context_len} tokens).")
        return ids, items, grammar_key

    def abort(self, rid: str, abort_all: bool) -> None:
        """Abort by rid prefix (SGLang's rule, so ``rid`` also aborts ``rid_0``, ``rid_1``...)."""
        self._abort_where((lambda r: True) if abort_all else (lambda r: r.rid == rid or r.rid.startswith(rid + "_")))

    def _abort_where(self, match: Callable[[Req], bool], why: str = "Aborted") -> None:
        """Abort the waiting and running requests ``match`` picks; ``why`` is a running one's message."""
        for req in [r for r in self.waiting if match(r)]:
            self.waiting.remove(req)
            if req.grammar is not None:
                self.grammars.release(req)
            self.outputs.finish_unrun(req, FinishReason(type="abort", message="Abort in waiting queue"))
        for req in self.running:
            if match(req) and req.finish is None:
                req.finish = FinishReason(type="abort", message=why)
                self.outputs.emit(req)  # answered now; the KV goes once no step in flight uses it
        self.outputs.release_finished()

    # ------------------------------------------------------------------ planning
    def schedule(self) -> Optional[ForwardPlan]:
        """The next step: decode rows, then chunked and newly admitted prefill rows."""
        draft = StepDraft()
        self.plan_rows = draft.booked
        for req, message in self.grammars.poll():  # compile errors and timeouts fail their request only
            self.waiting.remove(req)
            self.outputs.fail(req.rid, "value", message)
            if req.tokenized.session is not None:  # the turn failed: nothing to continue from
                self.sessions.table.drop(req.tokenized.session.id, req.rid)
        if not self.retraction.make_room_for_decodes(bool(self.plans_in_flight)) \
                or not self.retraction.preempt_for_waiting():
            return None  # wait for the steps in flight: their results free memory / the victim
        self._decode_rows(draft)
        decoding = len(draft.rows)
        prefill_budget = self.admission.step_budget(decoding > 0)
        for req in [r for r in self.running if continues_prefill(r, self.pipelined)]:  # a chunked prompt goes first
            prefill_budget -= self.admission.prefill_row(req, prefill_budget, draft)
        if prefill_budget > 0 and not self.admission_paused \
                and not any(r.prefilling and r.finish is None for r in self.running):
            self.admission.admit(draft, prefill_budget)
        if not draft.rows:
            return None
        self._grammar_masks(draft)
        used = draft.prefill_tokens()
        self.stats["max_step_prefill_tokens"] = max(self.stats["max_step_prefill_tokens"], used)
        if decoding:
            self.stats["max_prefill_tokens_beside_decode"] = max(self.stats["max_prefill_tokens_beside_decode"], used)
        self.step += 1
        self.plans_in_flight.append(PlannedStep(self.step, draft.booked))
        self.kv.decay_ratio()
        return ForwardPlan(step=self.step, new_slots=draft.new_slots, prefix_writes=draft.prefix_writes,
                           rows=draft.rows, lora_loads=self.lora.take_loads())

    def _decode_rows(self, draft: StepDraft) -> None:
        """One decode row per running request that decodes now (with pipeline micro-batches, at
        most its share of the running requests)."""
        share = len(self.running)
        if self.pipelined:
            share = -(-sum(r.finish is None for r in self.running) // self.micro_batches)
        for req in self.running:
            if decodes_now(req, self.pipelined) and len(draft.rows) < share:
                pos = req.num_tokens - 1
                verify = None if self.spec is None else self.spec.verify_row(
                    req, pos, self.kv.available_pages() - len(self.running))
                if verify is not None:  # speculative decoding: the last token and drafts, verified at once
                    draft.add(req, verify[0], verify[1], samples=True, prefill=False)
                    continue
                self.kv.grow(req, pos + 1)
                tok = PLACEHOLDER if req.samples_in_flight else req.last_id()
                row = PlanRow(req.slot, [tok], pos, req.locs(pos, pos + 1, self.page_size), lora_slot=req.lora_slot)
                draft.add(req, row, 1, samples=True, prefill=False)

    def _grammar_masks(self, draft: StepDraft) -> None:
        """Attach the token bitmask of every constrained row that samples."""
        idx = [i for i, b in enumerate(draft.booked) if b.samples and b.req.grammar is not None]
        if idx:
            for i, mask in zip(idx, self.grammars.fill([draft.booked[i].req for i in idx])):
                draft.rows[i].token_bitmask = mask

    # ------------------------------------------------------------------ results
    def apply_result(self, next_token_ids: list[int], extras: Optional[dict[int, RowOut]] = None,
                     step: Optional[int] = None) -> None:
        """The result of the oldest step in flight (``step``, if given, must be that one)."""
        done = self.plans_in_flight.popleft()
        if step is not None and step != done.step:
            raise RuntimeError(f"result of step {step} arrived while step {done.step} was expected")
        self.results.apply(done, next_token_ids, extras or {})
        self.outputs.log_progress(len(next_token_ids), len(self.waiting))

    def take_outputs(self) -> list[TokenOut]:
        return self.outputs.take()

    def take_errors(self) -> list[tuple[str, str, str]]:
        return self.outputs.take_errors()

    # ------------------------------------------------------------------ control
    def drop_cache_for_new_weights(self) -> None:
        """Empty the prefix cache (and sessions' KV) computed with the old weights. Waiting requests
        hold no cache node until admitted, so only running ones must be gone."""
        assert not self.running, "weights change only while no request runs"
        self.sessions.unlock_all()
        self.cache.reset()

    def flush_cache(self) -> bool:
        """Empty the prefix cache, only when nothing runs or waits (as SGLang); sessions lose their KV."""
        if not self.is_idle():
            return False
        self.sessions.unlock_all()
        self.cache.reset()
        return True

    # ------------------------------------------------------------------ introspection
    def finished_lora_unloads(self) -> list[str]:
        """Adapters whose unloading can complete now (no queued or running request names them)."""
        return self.lora.finish_unloads(r.tokenized.lora_name for r in self.waiting + self.running)

    def is_idle(self) -> bool:
        return not self.running and not self.waiting

    def check_integrity(self) -> None:
        """At idle every page is free or owned by the prefix cache, and every request and LoRA slot is free."""
        if self.is_idle():
            self.kv.check_idle()

    def internal_state(self) -> dict[str, Any]:
        c = self.cache
        return {
            "max_total_tokens": self.max_total_tokens, "max_running_requests": self.max_running,
            "context_length": self.context_len, "page_size": self.page_size,
            "num_running": len(self.running), "num_waiting": len(self.waiting),
            "free_pages": self.pages.free_pages, "num_pages": self.pages.num_pages,
            "cached_pages": c.cached_pages, "locked_pages": c.locked_pages,
            "evictable_pages": c.evictable_pages, "free_slots": self.slots.free_slots,
            "step": self.step, "new_token_ratio": self.kv.new_token_ratio, "num_sessions": len(self.sessions.sessions),
            **self.stats,
        }
