"""The step being planned: the rows the worker gets and, row for row, what the scheduler booked.

A request's counters run ahead of the worker (overlap scheduling): once its row is planned, the
row's positions count as computed and its sample as on the way, until the step's result comes
back (``Scheduler.apply_result``) and the counters are settled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from treadle.runtime.messages import NewSlot, PlanRow, PrefixWrite
from treadle.scheduler_proc.req import Req


class PlannedRow(msgspec.Struct):
    """The scheduler's side of one ``PlanRow``. A Struct rather than a dataclass: one is made per
    row per step, and a Struct takes less than half the time to build (the scheduler's hot loop)."""

    req: Req
    num_tokens: int  # positions the row computes
    samples: bool  # the row samples a token (a decode, or a prompt's last chunk)
    prefill: bool


@dataclass
class PlannedStep:
    """A step sent to the workers whose result has not been applied yet."""

    step: int
    rows: list[PlannedRow]


@dataclass
class StepDraft:
    """The plan of one step while it is built: decode rows first, then prefill rows."""

    rows: list[PlanRow] = field(default_factory=list)
    booked: list[PlannedRow] = field(default_factory=list)  # aligned with ``rows``
    new_slots: list[NewSlot] = field(default_factory=list)  # requests admitted this step
    prefix_writes: list[PrefixWrite] = field(default_factory=list)  # their cached prefixes

    def add(self, req: Req, row: PlanRow, num_tokens: int, samples: bool, prefill: bool) -> None:
        """Add a row and book it: its KV counts as computed from now on, its sample as on the way."""
        self.rows.append(row)
        self.booked.append(PlannedRow(req, num_tokens, samples, prefill))
        req.num_computed += num_tokens
        req.samples_in_flight += samples
        req.steps_in_flight += 1

    def has_prefill(self) -> bool:
        return any(b.prefill for b in self.booked)

    def prefill_tokens(self) -> int:
        return sum(b.num_tokens for b in self.booked if b.prefill)


def in_micro_batch_in_flight(req: Req, pipelined: bool) -> bool:
    """In a micro-batch in flight (pipeline parallelism: steps in flight hold disjoint requests)."""
    return pipelined and req.steps_in_flight > 0


def decodes_now(req: Req, pipelined: bool) -> bool:
    """Runs a decode row this step. With a token still in flight the row's input is a placeholder
    the worker fills, except for grammar requests (their mask needs the token) and requests whose
    in-flight token is their last. Embedding requests never decode."""
    if req.prefilling or req.finish is not None or in_micro_batch_in_flight(req, pipelined):
        return False
    if len(req.output_ids) + req.samples_in_flight >= req.max_new_tokens:  # its last token is on the way (or,
        return False  # an embedding, it makes none)
    return not (req.samples_in_flight and req.grammar is not None)


def continues_prefill(req: Req, pipelined: bool) -> bool:
    """A chunked prompt with chunks still to plan this step."""
    return req.prefilling and req.finish is None and not in_micro_batch_in_flight(req, pipelined)
