"""The scheduler's core: admit requests, build one forward plan per step, apply its results.

Continuous batching: every step runs the decode token of each running request, then prefill
work within a token budget (the rest of a chunked prompt first, then newly admitted requests,
each starting after its longest cached prefix). A prompt longer than ``chunked_prefill_size``
is split over steps, so decodes never wait for more than one chunk. Pages are taken as tokens
need them; when decoding runs out, the least advanced requests are retracted to the queue and
later recomputed (their KV stays in the prefix cache until evicted).
"""

from __future__ import annotations

import collections
import itertools
import logging
import random
import time
from typing import Any, Optional

import msgspec
import numpy as np

from treadle.runtime.messages import (
    PLACEHOLDER, FinishReason, ForwardPlan, NewSlot, PlanRow, PrefixWrite, RowOut, TokenizedReq, TokenOut,
)
from treadle.runtime.server_args import ServerArgs
from treadle.scheduler_proc.grammar import GrammarManager
from treadle.scheduler_proc.kv_pool import PageAllocator, SlotAllocator
from treadle.scheduler_proc.lora_slots import LoraSlots
from treadle.scheduler_proc.policy import order_waiting, priority_of
from treadle.scheduler_proc.radix_cache import RadixCache
from treadle.scheduler_proc.req import Req
from treadle.scheduler_proc.sessions import SessionTable
from treadle.scheduler_proc.stop_checker import check_finish, ends_with_stop_prefix

logger = logging.getLogger("treadle.scheduler")
LOG_IDS_EDGE = 32  # log_requests_level 2 shows this many ids at each end
PREEMPTION_GAP = 10  # priority gap that lets a waiting request displace a running one (SGLang's default)
FINISH_LAG_STEPS = 2  # steps from a request's last token being planned to its pages coming back (overlap)


def peak_growth(requests: list[tuple[int, int]]) -> int:
    """The most tokens a set of requests will hold beyond what they hold now, each given as
    ``(tokens it still makes, tokens it holds)`` and freeing all it holds once done: at step ``t``
    the ones still running have grown by ``t`` each and the finished ones have freed theirs, so
    the peak is at some request's last step."""
    peak, freed, n = 0, 0, len(requests)
    ordered = sorted(requests)
    for k, (remaining, held) in enumerate(ordered):
        if k == 0 or remaining != ordered[k - 1][0]:  # the first of equal lengths: all of them still run
            peak = max(peak, remaining * (n - k) - freed)
        freed += held
    return peak


class Scheduler:
    def __init__(self, args: ServerArgs, tokenizer: Any, eos_ids: set[int], worker_info: dict[str, Any],
                 hidden_size: int = 0, tokenizer_dir: Optional[str] = None) -> None:
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
        self.is_encoder = bool(worker_info.get("is_encoder"))  # bidirectional: no prefix can be reused
        self.normalize_embeddings = bool(worker_info.get("pooling", {}).get("normalize")) and not self.is_encoder
        no_cache = args.disable_radix_cache or self.is_encoder
        self.cache: Optional[RadixCache] = None if no_cache else RadixCache(self.page_size, self.pages)
        self.sessions = SessionTable()
        self._sessions_checked = 0.0  # when expire_sessions last looked
        self.lora = LoraSlots(args.max_loras_per_batch if args.enable_lora else 0, args.lora_eviction_policy)
        self.priority = args.enable_priority_scheduling or args.schedule_policy == "priority"
        cps = args.chunked_prefill_size
        self.chunk_size: Optional[int] = cps if cps is not None and cps > 0 else None
        # Longest output first admits the requests whose growth new_token_ratio underestimates most:
        # there, requests of certain length are reserved their exact peak instead (_decode_reserve)
        self.exact_reserve = args.schedule_policy == "lof"
        self.init_ratio = min(0.7 * args.schedule_conservativeness, 1.0)
        self.min_ratio = min(0.1 * args.schedule_conservativeness, self.init_ratio)
        self.new_token_ratio = self.init_ratio  # expected share of max_new_tokens still to come (admission)
        self.rng = random.Random(args.random_seed)  # schedule_policy="random"
        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.arrivals = itertools.count()
        self.step = 0
        self.plan_rows: list[tuple[Req, int, bool, bool]] = []  # (request, new tokens, samples, is prefill) per row
        self.inflight: collections.deque[tuple[int, list[tuple[Req, int, bool, bool]]]] = collections.deque()
        # Pipeline parallelism: up to pp_size steps in flight over disjoint requests (micro-batches),
        # each holding at most its share of the running requests, so every stage has work.
        self.micro_batches = args.pp_size
        self.max_inflight = args.pp_size if args.pp_size > 1 else (1 if args.disable_overlap_schedule else 2)
        self.outputs: list[TokenOut] = []
        self.errors: list[tuple[str, str, str]] = []  # (rid, kind, message) of requests failed after intake
        self.grammars = GrammarManager(args.grammar_backend or "xgrammar", tokenizer_dir, self.vocab_size, eos_ids,
                                       args.trust_remote_code)
        self.stats = {"prompt_tokens": 0, "cached_tokens": 0, "retractions": 0, "preemptions": 0,
                      "max_prefill_tokens_beside_decode": 0}
        self.num_generated = 0
        self.last_log = time.monotonic()

    # ------------------------------------------------------------------ intake
    def add_requests(self, reqs: list[TokenizedReq]) -> list[tuple[str, str, str]]:
        """Queue requests; returns ``(rid, error kind, message)`` for those refused."""
        rejected = []
        pool = self.pages.num_pages * self.page_size
        for tr in reqs:
            ids = tr.input_ids
            try:
                gkey = self.grammars.key_of(tr.sampling)
                if tr.lora_name is not None and not self.lora.serves(tr.lora_name):
                    raise ValueError(f"Got LoRA adapter that has never been loaded: {tr.lora_name}")
                items = tr.mm_items
                if tr.session is not None:
                    ids, items = self.sessions.context(tr.session, tr.rid, ids, items)
                if len(ids) + 1 > pool:
                    raise ValueError(f"Input length ({len(ids)} tokens) exceeds the KV cache capacity "
                                     f"({self.max_total_tokens} tokens). Use a shorter input or a larger max_total_tokens.")
                if len(ids) >= self.context_len + tr.embed:  # an embedding may fill the context
                    raise ValueError(f"The input ({len(ids)} tokens) is longer than the model's context length "
                                     f"({self.context_len} tokens).")
            except ValueError as e:
                rejected.append((tr.rid, "value", str(e)))
                continue
            # max_new_tokens is clamped to what the context and the KV pool can hold (API.md 4.1)
            room = min(self.context_len, pool) - len(ids)
            max_new = room if tr.sampling.max_new_tokens is None else min(tr.sampling.max_new_tokens, room)
            if tr.embed:
                max_new = 0  # prefill only; the result is an embedding
            req = Req(tr, max_new, self.eos_ids, self.hidden_size)
            req.input_ids, req.arrival, req.mm_items = ids, next(self.arrivals), items
            if not self._queue_has_room(req):
                rejected.append((tr.rid, "overloaded", "The request queue is full."))
                continue
            if tr.session is not None:
                self.sessions.begin(tr.session, tr.rid, ids, items)
            if self.args.log_requests:
                self._log_request("receive", req, ids)
            if max_new == 0 and not tr.embed:
                req.finish = FinishReason(type="length", length=0)
                self._emit(req)
                self._left_unrun(req)
                continue
            if gkey is not None:  # compiles off the loop; admitted once compiled (see _admit)
                self.grammars.attach(req, gkey)
            req.t_queued = time.monotonic()
            self.waiting.append(req)
        return rejected

    def _queue_has_room(self, req: Req) -> bool:
        """``max_queued_requests``: with priorities, a more important newcomer displaces the least
        important waiting request (newest on ties), which is aborted as overloaded."""
        limit = self.args.max_queued_requests
        if limit is None or len(self.waiting) < limit:
            return True
        if not self.priority:
            return False
        victim = min(self.waiting, key=lambda r: (priority_of(r), -r.arrival))
        if priority_of(req) <= priority_of(victim):
            return False
        self.waiting.remove(victim)
        victim.finish = FinishReason(type="abort", message="The request is aborted by a higher priority request.",
                                     status_code=503)
        self._emit(victim)
        self._left_unrun(victim)
        return True

    def abort(self, rid: str, abort_all: bool) -> None:
        """Abort by rid prefix (SGLang's rule, so ``rid`` also aborts ``rid_0``, ``rid_1``...)."""
        match = (lambda r: True) if abort_all else (lambda r: r.rid == rid or r.rid.startswith(rid + "_"))
        for req in [r for r in self.waiting if match(r)]:
            self.waiting.remove(req)
            if req.grammar is not None:
                self.grammars.release(req)
            req.finish = FinishReason(type="abort", message="Abort in waiting queue")
            self._emit(req)
            self._left_unrun(req)
        for req in self.running:
            if match(req) and req.finish is None:
                req.finish = FinishReason(type="abort", message="Aborted")
                self._emit(req)  # answered now; the KV goes once no step in flight uses it
        self._release_finished()

    # ------------------------------------------------------------------ planning
    def schedule(self) -> Optional[ForwardPlan]:
        """The next step: decode rows, then chunked and newly admitted prefill rows."""
        rows: list[PlanRow] = []
        new_slots: list[NewSlot] = []
        prefix_writes: list[PrefixWrite] = []
        self.plan_rows = []
        for req, message in self.grammars.poll():  # compile errors and timeouts fail their request only
            self.waiting.remove(req)
            self.errors.append((req.rid, "value", message))
            if req.tr.session is not None:  # the turn failed: nothing to continue from
                self.sessions.drop(req.tr.session.id, req.rid)
        if not self._make_room_for_decodes() or not self._preempt_for_waiting():
            return None  # wait for the steps in flight: their results free memory / the victim
        share = len(self.running)  # pipeline micro-batches: each takes its share of the running requests
        if self.micro_batches > 1:
            share = -(-sum(r.finish is None for r in self.running) // self.micro_batches)
        for req in self.running:
            if self._decodable(req) and len(rows) < share:
                pos = req.num_tokens - 1
                self._grow(req, pos + 1)
                tok = PLACEHOLDER if req.pending else req.last_id()
                rows.append(PlanRow(req.slot, [tok], pos, req.locs(pos, pos + 1, self.page_size),
                                    lora_slot=req.lora_slot))
                self._planned(req, 1, True, False)
        decoding = len(rows)
        budget = min(self.args.max_prefill_tokens, self.chunk_size or self.args.max_prefill_tokens)
        continuing = [r for r in self.running if r.prefilling and r.finish is None and not self._busy(r)]
        for req in continuing:  # a chunked prompt continues first
            budget -= self._prefill_row(req, budget, rows)
        if budget > 0 and not any(r.prefilling and r.finish is None for r in self.running):
            budget = self._admit(budget, rows, new_slots, prefix_writes)
        if not rows:
            return None
        self._grammar_masks(rows)
        if decoding:
            used = sum(n for _, n, _, pre in self.plan_rows if pre)
            self.stats["max_prefill_tokens_beside_decode"] = max(self.stats["max_prefill_tokens_beside_decode"], used)
        self.step += 1
        self.inflight.append((self.step, self.plan_rows))
        self.new_token_ratio = max(self.min_ratio, self.new_token_ratio - (self.init_ratio - self.min_ratio) / 600)
        return ForwardPlan(step=self.step, new_slots=new_slots, prefix_writes=prefix_writes, rows=rows,
                           lora_loads=self.lora.take_loads())

    def _decodable(self, req: Req) -> bool:
        """Runs a decode row this step. With a token still in flight the row's input is a placeholder
        the worker fills, except for grammar requests (their mask needs the token) and requests whose
        in-flight token is their last. Embedding requests never decode."""
        if req.prefilling or req.finish is not None or self._busy(req):
            return False
        if len(req.output_ids) + req.pending >= req.max_new_tokens:  # its last token is on the way (or, an
            return False  # embedding, it makes none)
        return not (req.pending and req.grammar is not None)

    def _busy(self, req: Req) -> bool:
        """In a micro-batch in flight (pipeline parallelism: steps in flight hold disjoint requests)."""
        return self.micro_batches > 1 and req.inflight > 0

    def _planned(self, req: Req, n: int, samples: bool, prefill: bool) -> None:
        """Book a row: its KV counts as computed from now on, its sample as pending."""
        self.plan_rows.append((req, n, samples, prefill))
        req.num_computed += n
        req.pending += samples
        req.inflight += 1

    def _admit(self, budget: int, rows: list[PlanRow], new_slots: list[NewSlot], prefix_writes: list[PrefixWrite]) -> int:
        started = any(pre for _, _, _, pre in self.plan_rows)  # prefill work already in this step
        for req in order_waiting(self.waiting, self.args.schedule_policy, self.priority,
                                 lambda r: self._match(r, r.key_ids()), self.rng):
            if req.grammar is not None and not req.grammar.ready:
                continue  # still compiling: others go ahead
            if self.slots.free_slots == 0:
                break
            ids = req.key_ids()
            pages, node = self._match(req, ids)
            matched = len(pages) * self.page_size
            want = len(ids) - matched
            # input logprobs and embeddings come from one whole prefill row (never chunked)
            whole = (req.tr.return_logprob and req.tr.logprob_start_len >= 0) or req.tr.embed
            unchunked = whole or self.chunk_size is None
            if unchunked and want > budget and started:
                break  # over the step's budget: it runs whole in a later step (alone if need be)
            n = want if unchunked else min(want, budget)
            if self.cache is not None:
                self.cache.lock(node)
            need = self.pages.pages_for(matched + n) - len(pages)
            # a request of certain length must find room for its later prompt chunks too
            later = self.pages.pages_for(matched + want) - len(pages) - need if self._certain(req) else 0
            if need + later > self._available_pages() - self._decode_reserve(req):
                if self.cache is not None:
                    self.cache.unlock(node)
                break
            if req.tr.lora_name is not None:
                slot = self.lora.acquire(req.tr.lora_name)
                if slot is None:  # every device slot serves running requests of other adapters
                    if self.cache is not None:
                        self.cache.unlock(node)
                    continue
                req.lora_slot = slot
            self.waiting.remove(req)
            req.t_admitted = req.t_admitted or time.monotonic()  # a retracted request keeps its first admission
            req.slot = self.slots.alloc()
            req.pages, req.shared_pages, req.cache_node = list(pages), len(pages), node
            req.num_computed, req.fill_len = matched, len(ids)
            if req.num_retractions == 0:
                req.cached_tokens = matched
                self.stats["prompt_tokens"] += len(ids)
                self.stats["cached_tokens"] += matched
            new_slots.append(NewSlot(req.slot, req.sampling_spec(self.vocab_size), list(req.output_ids)))
            if matched:
                prefix_writes.append(PrefixWrite(req.slot, req.locs(0, matched, self.page_size)))
            self.running.append(req)
            budget -= self._prefill_row(req, n, rows)
            started = True
            if budget <= 0 or n < want:  # one chunked request at a time
                break
        return budget

    def _prefill_row(self, req: Req, budget: int, rows: list[PlanRow]) -> int:
        """Append the next prefill chunk of ``req`` (at most ``budget`` tokens, and no more than the
        free pages hold: decodes took theirs first); returns its size."""
        start = req.num_computed
        room = (len(req.pages) + self._available_pages()) * self.page_size - start
        n = min(req.fill_len - start, budget, room)
        if n <= 0:
            return 0
        self._grow(req, start + n)
        done = start + n == req.fill_len
        lp_from = -1
        if not req.input_logprobs_done and req.tr.return_logprob and req.tr.logprob_start_len >= 0:
            lp_from = max(0, req.tr.logprob_start_len - start)
        ids = req.all_ids()[start:start + n]
        samples = done and not req.tr.embed
        rows.append(PlanRow(req.slot, ids, start, req.locs(start, start + n, self.page_size), samples, lp_from,
                            lora_slot=req.lora_slot, mm=req.mm_chunks(start, start + n) if req.mm_items else []))
        self._planned(req, n, samples, True)
        req.t_launched = req.t_launched or time.monotonic()  # its first chunk's step is being planned
        return n

    def _grammar_masks(self, rows: list[PlanRow]) -> None:
        """Attach the token bitmask of every constrained row that samples (plan_rows align with rows)."""
        idx = [i for i, (req, _, samples, _) in enumerate(self.plan_rows) if samples and req.grammar is not None]
        if idx:
            for i, mask in zip(idx, self.grammars.fill([self.plan_rows[i][0] for i in idx])):
                rows[i].token_bitmask = mask

    def _match(self, req: Req, ids: list[int]) -> tuple[list[int], Any]:
        """The cached prefix to reuse: at most len - 1 tokens (one must run to sample), and not past
        ``logprob_start_len`` when input logprobs are wanted."""
        if self.cache is None:
            return [], None
        cap = len(ids) - 1
        if req.tr.return_logprob and req.tr.logprob_start_len >= 0 and not req.input_logprobs_done:
            cap = min(cap, req.tr.logprob_start_len)
        return self.cache.match_prefix(ids, max_len=cap, namespace=req.cache_namespace)


    # ------------------------------------------------------------------ memory
    def _available_pages(self) -> int:
        return self.pages.free_pages + (self.cache.evictable_pages if self.cache is not None else 0)

    def _decode_reserve(self, candidate: Optional[Req] = None) -> int:
        """Pages the running requests are expected to still need: the rest of their prompts, and of
        their outputs ``new_token_ratio`` of what they may still make (SGLang's estimate), except, with
        ``lof``, for requests whose length is certain (``Req.ends_only_by_length``): those need the
        peak of their joint growth over the coming steps, net of what the ones that finish first
        free. A ``candidate`` for admission counts among those (its prompt is the caller's to charge).

        Why only with ``lof``: on the CI workload (one H100) the exact peak ended lof's retractions
        (47 in the schedule model, each a prompt run again) and made it 3.5% faster than fcfs, while
        under fcfs, where early finishers keep freeing pages, the ratio's optimism never retracted
        and its fuller pool was 1.1% faster than the exact peak."""
        tokens, certain = 0.0, []
        if candidate is not None and self._certain(candidate):
            certain.append((candidate.remaining_tokens(), len(candidate.all_ids())))
        for r in self.running:
            tokens += max(0, r.fill_len - r.num_computed)
            if self._certain(r):
                certain.append((r.remaining_tokens(), r.num_tokens))
            else:
                tokens += r.remaining_tokens() * self.new_token_ratio
        lag = FINISH_LAG_STEPS * len(certain)  # the others keep growing while a finisher's pages come back
        return int((tokens + peak_growth(certain) + lag) / self.page_size) + len(self.running)

    def _certain(self, req: Req) -> bool:
        """Reserved its exact KV growth (with ``lof``; see ``exact_reserve``)."""
        return self.exact_reserve and req.ends_only_by_length()

    def _take_pages(self, n: int) -> list[int]:
        if n > self.pages.free_pages and self.cache is not None:
            self.cache.evict(n - self.pages.free_pages)
        return self.pages.alloc(n)

    def _grow(self, req: Req, num_tokens: int) -> None:
        need = self.pages.pages_for(num_tokens) - len(req.pages)
        if need > 0:
            req.pages += self._take_pages(need)

    def _make_room_for_decodes(self) -> bool:
        """Retract running requests (fewest outputs first, then longest prompt) until every decode
        has a page for its next token; the retracted go back to the front of the queue. False: no
        room yet, but steps are in flight (nothing is retracted under a running step)."""
        while True:
            decoding = [r for r in self.running if self._decodable(r)]
            need = sum(1 for r in decoding if self.pages.pages_for(r.num_tokens) > len(r.pages))
            # a chunked prompt must be able to take its next page too, or it could wait forever
            need += sum(1 for r in self.running if r.prefilling and r.finish is None and not self._busy(r)
                        and r.num_computed >= len(r.pages) * self.page_size)
            if need <= self._available_pages() or not self.running:
                return True
            if self.inflight:
                return False
            if len(self.running) == 1:
                req = self.running[0]
                req.finish = FinishReason(type="abort", message="Out of KV cache memory for this request.",
                                          status_code=500)
                self._release_finished()
                return True
            victim = min(self.running, key=lambda r: (len(r.output_ids), -len(r.input_ids)))
            self._retract(victim)
            self.stats["retractions"] += 1
            self.new_token_ratio = self.init_ratio

    def _preempt_for_waiting(self) -> bool:
        """Priority preemption, before the step is built: when every slot is taken, the most
        important waiting request displaces the least important running one if it beats it by
        ``PREEMPTION_GAP`` or more. False: that victim is in a step in flight; wait for it."""
        if not self.priority or self.slots.free_slots > 0 or not self.running:
            return True
        ready = [r for r in self.waiting if r.grammar is None or r.grammar.ready]
        live = [r for r in self.running if r.finish is None]
        if not ready or not live:
            return True
        req = max(ready, key=lambda r: (priority_of(r), -r.arrival))
        victim = min(live, key=lambda r: (priority_of(r), -r.arrival))
        if priority_of(req) - priority_of(victim) < PREEMPTION_GAP:
            return True
        if victim.inflight:
            return False
        self._retract(victim)
        self.stats["preemptions"] += 1
        return True

    def _retract(self, req: Req) -> None:
        self.running.remove(req)
        self._free_kv(req)
        req.num_retractions += 1
        self.waiting.insert(0, req)

    def _free_kv(self, req: Req) -> None:
        """Give a request's pages back: whole computed pages go into the prefix cache (which frees
        duplicates), the rest to the allocator; then its slot. Only positions whose token is known
        count: a step in flight may have computed the KV of a token that was then dropped (the
        request failed or was aborted meanwhile)."""
        if self.cache is not None:
            k = min(req.num_computed, req.seq_len) // self.page_size
            if k >= req.shared_pages and k > 0:
                self.cache.insert(req.key_ids()[: k * self.page_size], req.pages[:k], req.cache_namespace)
            else:
                k = req.shared_pages
            self.cache.unlock(req.cache_node)
            self.pages.free(req.pages[k:])
        else:
            self.pages.free(req.pages)
        self.slots.free(req.slot)
        if req.lora_slot >= 0:
            self.lora.release(req.tr.lora_name)
        req.pages, req.shared_pages, req.cache_node, req.slot, req.lora_slot = [], 0, None, None, -1
        req.mm_sent.clear()  # a new slot: the worker has no embeddings for it
        req.num_computed = req.fill_len = 0

    # ------------------------------------------------------------------ results
    def apply_result(self, next_token_ids: list[int], extras: Optional[dict[int, RowOut]] = None,
                     step: Optional[int] = None) -> None:
        """The result of the oldest step in flight (``step``, if given, must be that one)."""
        done, rows = self.inflight.popleft()
        if step is not None and step != done:
            raise RuntimeError(f"result of step {step} arrived while step {done} was expected")
        extras = extras or {}
        tokens = iter(next_token_ids)
        for i, (req, n_new, samples, prefill) in enumerate(rows):
            tok = next(tokens) if samples else None
            req.inflight -= 1
            req.pending -= samples
            if req.finish is not None:  # aborted, or finished by a token of an earlier step
                continue
            if i in extras and extras[i].error:  # its custom logit processor raised: this request fails
                req.finish = FinishReason(type="abort", message=extras[i].error)
                req.finish_sent = True  # the client gets the error instead of a result
                self.errors.append((req.rid, "runtime", extras[i].error))
                continue
            if req.tr.embed and not req.prefilling:
                self._finish_embedding(req, extras.get(i))
                continue
            if i in extras and req.meta is not None:
                req.record_meta(prefill, tok, extras[i])
            if tok is None:
                continue
            if prefill and not req.t_prefilled:
                req.t_prefilled = time.monotonic()
            req.output_ids.append(tok)
            if req.grammar is not None:  # a terminated grammar stops, after the length rule (API.md 4.2)
                fin = self.grammars.advance(req, tok)
                if fin is not None and len(req.output_ids) < req.max_new_tokens:
                    req.finish = fin
            check_finish(req, self.tokenizer)
            if req.finish is not None or self._should_stream(req):
                self._emit(req)
        self.num_generated += len(next_token_ids)
        self._release_finished()
        self._maybe_log()

    def _finish_embedding(self, req: Req, extra: Optional[RowOut]) -> None:
        if extra is None or not extra.hidden:
            raise RuntimeError(f"the worker returned no embedding for {req.rid}")
        vec = np.frombuffer(extra.hidden, dtype=np.float32)
        if self.normalize_embeddings:
            vec = vec / max(float(np.linalg.norm(vec)), 1e-12)
        req.embedding = vec.astype(np.float32).tobytes()
        req.finish = FinishReason(type="length", length=0)
        self._emit(req)

    def _should_stream(self, req: Req) -> bool:
        if not req.tr.stream:
            return False
        k = req.sampling.stream_interval or self.args.stream_interval
        n = len(req.output_ids)
        due = req.sent < n if k == 1 else (n - req.sent) >= k or req.sent == 0
        return due and not ends_with_stop_prefix(req, self.tokenizer)

    def _emit(self, req: Req) -> None:
        self.outputs.append(req.token_out(self.args.enable_metrics))

    def _log_request(self, event: str, req: Req, ids: list[int]) -> None:
        """``log_requests``: the request's sizes (level 0), its sampling parameters (1), the head and
        tail of its prompt or output ids (2), all of them (3), as SGLang's ``log_requests_level``."""
        level = self.args.log_requests_level
        parts = [f"{event} rid={req.rid}"]
        if event == "receive":
            parts.append(f"prompt_tokens={len(ids)} max_new_tokens={req.max_new_tokens}")
        else:
            parts.append(f"completion_tokens={len(ids)} reason={req.finish.to_json()}")
        if level >= 1 and event == "receive":
            parts.append(f"sampling={msgspec.json.encode(req.tr.sampling).decode()}")
        if level >= 2:
            shown = ids if level >= 3 or len(ids) <= 2 * LOG_IDS_EDGE else \
                [*ids[:LOG_IDS_EDGE], "...", *ids[-LOG_IDS_EDGE:]]
            parts.append(f"{'input' if event == 'receive' else 'output'}_ids={shown}")
        logger.info(" ".join(parts))

    def _release_finished(self) -> None:
        keep = []
        for req in self.running:
            if req.finish is None or req.inflight:  # a step in flight still uses its slot and KV
                keep.append(req)
                continue
            if not req.finish_sent:
                self._emit(req)
            if self.args.log_requests:
                self._log_request("finish", req, req.output_ids)
            session = req.tr.session
            self._free_kv(req)
            if session is not None:
                self._session_turn_done(session.id, req)
        self.running = keep

    def _left_unrun(self, req: Req) -> None:
        """A request that finished from the queue (aborted, displaced, nothing to generate) ends
        its session turn as a running one does."""
        if req.tr.session is not None:
            self._session_turn_done(req.tr.session.id, req)

    def _session_turn_done(self, sid: str, req: Req) -> None:
        """Keep the KV of a session's latest turn locked in the cache until the session closes."""
        sess = self.sessions.finish(sid, req.rid, req.output_ids)
        if sess is not None and sess.closing:  # a close asked while the streaming turn ran
            self.close_session(sid)
            return
        if sess is None or self.cache is None:
            return
        _, node = self.cache.match_prefix(req.key_ids(), namespace=req.cache_namespace)
        self.cache.lock(node)
        if sess.lock_node is not None:
            self.cache.unlock(sess.lock_node)
        sess.lock_node = node

    def take_outputs(self) -> list[TokenOut]:
        out, self.outputs = self.outputs, []
        return out

    def take_errors(self) -> list[tuple[str, str, str]]:
        out, self.errors = self.errors, []
        return out

    # ------------------------------------------------------------------ control
    def open_session(self, sid: str, timeout: Optional[float] = None, streaming: bool = False) -> bool:
        return self.sessions.open(sid, timeout, streaming)

    def close_session(self, sid: str) -> bool:
        sess = self.sessions.close(sid)
        if sess is not None and sess.lock_node is not None and self.cache is not None:
            self.cache.unlock(sess.lock_node)
        return sess is not None

    def expire_sessions(self) -> None:
        """Close sessions idle past their timeout; looks about once a second."""
        now = time.monotonic()
        if now - self._sessions_checked < 1.0:
            return
        self._sessions_checked = now
        for sid in self.sessions.expired(now):
            logger.info("session %s closed after its timeout", sid)
            self.close_session(sid)

    def flush_cache(self) -> bool:
        """Empty the prefix cache, only when nothing runs or waits (as SGLang); sessions lose their KV."""
        if not self.is_idle():
            return False
        if self.cache is not None:
            for sess in self.sessions.sessions.values():
                if sess.lock_node is not None:
                    self.cache.unlock(sess.lock_node)
                    sess.lock_node = None
            self.cache.reset()
        return True

    # ------------------------------------------------------------------ introspection
    def finished_lora_unloads(self) -> list[str]:
        """Adapters whose unloading can complete now (no queued or running request names them)."""
        return self.lora.finish_unloads(r.tr.lora_name for r in self.waiting + self.running)

    def is_idle(self) -> bool:
        return not self.running and not self.waiting

    def check_integrity(self) -> None:
        """At idle every page is free or owned by the prefix cache, and every request and LoRA slot is free."""
        if self.is_idle():
            cached = self.cache.cached_pages if self.cache is not None else 0
            assert self.pages.free_pages + cached == self.pages.num_pages, "KV page leak"
            assert self.slots.free_slots == self.slots.num_slots, "request slot leak"
            assert not any(self.lora.users.values()), "LoRA slot leak"

    def internal_state(self) -> dict[str, Any]:
        c = self.cache
        return {
            "max_total_tokens": self.max_total_tokens, "max_running_requests": self.max_running,
            "context_length": self.context_len, "page_size": self.page_size,
            "num_running": len(self.running), "num_waiting": len(self.waiting),
            "free_pages": self.pages.free_pages, "num_pages": self.pages.num_pages,
            "cached_pages": c.cached_pages if c else 0, "locked_pages": c.locked_pages if c else 0,
            "evictable_pages": c.evictable_pages if c else 0, "free_slots": self.slots.free_slots,
            "step": self.step, "new_token_ratio": self.new_token_ratio, "num_sessions": len(self.sessions.sessions),
            **self.stats,
        }

    def _maybe_log(self) -> None:
        now = time.monotonic()
        if now - self.last_log >= 5.0 and self.running:
            tput = self.num_generated / (now - self.last_log)
            logger.info("decode: #running-req %d, #waiting %d, gen throughput %.1f tok/s",
                        len(self.running), len(self.waiting), tput)
            self.num_generated, self.last_log = 0, now
