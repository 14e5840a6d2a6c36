"""A step's result applied to the requests that ran in it: the other half of a step, after
``Scheduler.schedule`` planned it. Each row's counters, which ran ahead while the step was in
flight (plan.py), are settled; its sampled token is appended (a verify row's accepted tokens, a
pooled embedding); finishes are detected (stop rules, a terminated grammar, a custom logit
processor that raised); outputs go out when a request finishes or its stream is due."""

from __future__ import annotations

import time
from typing import Any, Optional

from treadle.runtime.messages import FinishReason, RowOut
from treadle.scheduler_proc.grammar import GrammarManager
from treadle.scheduler_proc.outputs import Outputs
from treadle.scheduler_proc.plan import PlannedStep
from treadle.scheduler_proc.spec_sched import Speculation, speculates
from treadle.scheduler_proc.stop_checker import check_finish


class StepResults:
    def __init__(self, outputs: Outputs, grammars: GrammarManager, spec: Optional[Speculation], tokenizer: Any) -> None:
        self.outputs, self.grammars, self.spec, self.tokenizer = outputs, grammars, spec, tokenizer

    def apply(self, done: PlannedStep, next_token_ids: list[int], extras: dict[int, RowOut]) -> None:
        """``next_token_ids``: one per sampling row of ``done``, in row order; ``extras``: by row
        index, what else a row returned (logprobs, hidden states, an embedding, drafts, an error).
        One loop over the rows, no call per row: this runs for every row of every step."""
        tokens = iter(next_token_ids)
        for i, row in enumerate(done.rows):
            req = row.req
            tok = next(tokens) if row.samples else None
            req.steps_in_flight -= 1
            req.samples_in_flight -= row.samples
            if req.finish is not None:  # aborted, or finished by a token of an earlier step
                continue
            if i in extras and extras[i].error:  # its custom logit processor raised: this request fails
                req.finish = FinishReason(type="abort", message=extras[i].error)
                req.finish_sent = True  # the client gets the error instead of a result
                self.outputs.fail(req.rid, "runtime", extras[i].error)
                continue
            if req.tokenized.embed and not req.prefilling:
                self.outputs.finish_embedding(req, extras.get(i))
                continue
            if i in extras and extras[i].spec_ids:  # a verify row: 1 to k + 1 tokens
                self.spec.apply(req, extras[i], row.num_tokens - 1, self.tokenizer)
                if req.finish is not None or self.outputs.should_stream(req):
                    self.outputs.emit(req)
                continue
            if req.spec_counts is not None and tok is not None and not row.prefill and speculates(req):
                req.spec_counts[0] += 1  # a decode without drafts: a verify of none
            if i in extras and req.meta is not None:
                req.record_meta(row.prefill, tok, extras[i])
            if tok is None:
                continue
            if row.prefill and not req.t_prefilled:
                req.t_prefilled = time.monotonic()
            req.output_ids.append(tok)
            if req.grammar is not None:  # a terminated grammar stops, after the length rule (API.md 4.2)
                fin = self.grammars.advance(req, tok)
                if fin is not None and len(req.output_ids) < req.max_new_tokens:
                    req.finish = fin
            check_finish(req, self.tokenizer)
            if req.finish is not None or self.outputs.should_stream(req):
                self.outputs.emit(req)
        self.outputs.release_finished()
