"""Taking requests back off the GPU: retraction when decoding runs out of pages, and priority
preemption when every slot is taken.

A retracted request goes back to the front of the queue and is later recomputed; its computed
pages stay in the prefix cache until evicted, so the recomputation often starts from a cached
prefix. Nothing is retracted under a step in flight (its rows use the request's slot and KV).
"""

from __future__ import annotations

from treadle.runtime.messages import FinishReason
from treadle.scheduler_proc.memory import KvBudget
from treadle.scheduler_proc.outputs import Outputs
from treadle.scheduler_proc.plan import continues_prefill, decodes_now
from treadle.scheduler_proc.policy import priority_of
from treadle.scheduler_proc.req import Req

PREEMPTION_GAP = 10  # priority gap that lets a waiting request displace a running one (SGLang's default)


class Retraction:
    """Moves requests from ``running`` back to ``waiting`` (the scheduler's lists, changed in place)."""

    def __init__(self, kv: KvBudget, outputs: Outputs, waiting: list[Req], running: list[Req],
                 stats: dict[str, int], pipelined: bool, priority: bool) -> None:
        self.kv = kv
        self.outputs = outputs
        self.waiting = waiting
        self.running = running
        self.stats = stats
        self.pipelined = pipelined
        self.priority = priority

    def make_room_for_decodes(self, any_plan_in_flight: bool) -> bool:
        """Retract running requests (fewest outputs first, then longest prompt) until every decode
        has a page for its next token; the retracted go back to the front of the queue. False: no
        room yet, but steps are in flight (nothing is retracted under a running step)."""
        while True:
            decoding = [r for r in self.running if decodes_now(r, self.pipelined)]
            need = sum(1 for r in decoding if self.kv.pages.pages_for(r.num_tokens) > len(r.pages))
            # a chunked prompt must be able to take its next page too, or it could wait forever
            need += sum(1 for r in self.running if continues_prefill(r, self.pipelined)
                        and r.num_computed >= len(r.pages) * self.kv.page_size)
            if need <= self.kv.available_pages() or not self.running:
                return True
            if any_plan_in_flight:
                return False
            if len(self.running) == 1:
                req = self.running[0]
                req.finish = FinishReason(type="abort", message="Out of KV cache memory for this request.",
                                          status_code=500)
                self.outputs.release_finished()
                return True
            victim = min(self.running, key=lambda r: (len(r.output_ids), -len(r.input_ids)))
            self.retract(victim)
            self.stats["retractions"] += 1
            self.kv.reset_ratio()

    def preempt_for_waiting(self) -> bool:
        """Priority preemption, before the step is built: when every slot is taken, the most
        important waiting request displaces the least important running one if it beats it by
        ``PREEMPTION_GAP`` or more. False: that victim is in a step in flight; wait for it."""
        if not self.priority or self.kv.slots.free_slots > 0 or not self.running:
            return True
        ready = [r for r in self.waiting if r.grammar is None or r.grammar.ready]
        live = [r for r in self.running if r.finish is None]
        if not ready or not live:
            return True
        req = max(ready, key=lambda r: (priority_of(r), -r.arrival))
        victim = min(live, key=lambda r: (priority_of(r), -r.arrival))
        if priority_of(req) - priority_of(victim) < PREEMPTION_GAP:
            return True
        if victim.steps_in_flight:
            return False
        self.retract(victim)
        self.stats["preemptions"] += 1
        return True

    def retract(self, req: Req) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.num_retractions += 1
        self.waiting.insert(0, req)
