"""The scheduler's side of speculative decoding: which requests speculate, their verify rows, and
applying what a verify row produced.

A verify row runs the request's last token and ``k`` drafts at positions ``pos .. pos + k`` in one
forward (an extend with causal attention over the cached prefix). The worker accepts the longest
draft prefix the target agrees with (greedy: equal argmax; sampling: rejection sampling) and adds
one token of its own, so every verify yields 1 to ``k + 1`` tokens. The KV of rejected positions
is garbage: ``num_computed`` is rolled back to the accepted length, so later rows overwrite those
locations and the prefix cache only ever takes positions whose token is known
(``KvBudget.free``). The pages stay with the request; they hold its next positions anyway.

Requests whose next token depends on their own history in ways a chain check cannot replay
(grammars, penalties, logit_bias, min_new_tokens, custom logit processors) and embedding or
hidden-state requests decode one token a step as before (docs/speculative.md).
"""

from __future__ import annotations

from typing import Any, Optional

from treadle.runtime.messages import PlanRow, RowOut
from treadle.runtime.server_args import ServerArgs
from treadle.scheduler_proc.memory import KvBudget
from treadle.scheduler_proc.req import Req
from treadle.scheduler_proc.spec_ngram import ngram_draft, ngram_tree
from treadle.scheduler_proc.stop_checker import check_finish


def speculates(req: Req) -> bool:
    """Whether a chain check keeps this request's distribution: its sampling must depend on nothing
    but the logits (temperature, top-k/p, min-p, seeds are fine)."""
    s, tr = req.sampling, req.tokenized
    return (req.grammar is None and not tr.embed and not tr.return_hidden_states and not s.logit_bias
            and s.frequency_penalty == 0.0 and s.presence_penalty == 0.0 and s.repetition_penalty == 1.0
            and not s.min_new_tokens and tr.custom_logit_processor is None)


class Speculation:
    """Verify rows for the requests that speculate, and the per-request acceptance counters."""

    def __init__(self, args: ServerArgs, kv: KvBudget, context_len: int) -> None:
        self.algorithm = args.speculative_algorithm
        self.num_drafts = (args.speculative_num_draft_tokens or 1) - 1
        self.num_steps = args.speculative_num_steps or self.num_drafts
        self.topk = args.speculative_eagle_topk or 1
        self.min_window = args.speculative_ngram_min_match_window_size
        self.max_window = args.speculative_ngram_max_match_window_size
        self.kv = kv
        self.context_len = context_len

    def verify_row(self, req: Req, pos: int, spare_pages: int) -> Optional[tuple[PlanRow, int]]:
        """The verify row of a request whose last token sits at ``pos`` (known: no sample in flight),
        and the positions it books; None when it decodes one token (no draft, or no room)."""
        if req.samples_in_flight or not speculates(req):
            return None
        k = min(self.num_drafts, req.remaining_tokens() - 1, self.context_len - 1 - pos)
        if k <= 0:
            return None
        page = self.kv.page_size
        extra = self.kv.pages.pages_for(pos + 1 + k) - max(len(req.pages), self.kv.pages.pages_for(pos + 1))
        if extra > spare_pages:
            return None
        last, tree = req.last_id(), []
        if self.algorithm == "NGRAM" and self.topk > 1:  # several earlier matches: a trie of continuations
            drafts, tree = ngram_tree(req.all_ids(), k, self.topk, self.min_window, self.max_window)
            if not drafts:
                return None
            if tree == list(range(len(tree))):  # one branch: an ordinary chain
                tree = []
            k, ids, steps, prev = len(drafts), [last, *drafts], 0, -1
        elif self.algorithm == "NGRAM":
            drafts = ngram_draft(req.all_ids(), k, self.min_window, self.max_window)
            if not drafts:
                return None
            k, ids, steps, prev = len(drafts), [last, *drafts], 0, -1
        elif self.algorithm == "STANDALONE":  # the worker's draft model fills the k placeholders
            ids, steps, prev = [last], k, req.all_ids()[pos - 1]
        else:  # EAGLE / EAGLE3: the worker's draft head fills k nodes (a chain, or a tree from its top-k)
            ids, steps, prev = [last], min(self.num_steps, k), -1
        self.kv.grow(req, pos + 1 + k)
        row = PlanRow(req.slot, ids, pos, req.locs(pos, pos + 1 + k, page), lora_slot=req.lora_slot,
                      spec=k, draft_steps=steps, prev_id=prev, tree=tree)
        return row, 1 + k

    @staticmethod
    def apply(req: Req, out: RowOut, num_drafts: int, tokenizer: Any) -> None:
        """Append a verify row's tokens up to the first that finishes the request (a stop id or
        string, ``max_new_tokens``), record their logprobs, and roll ``num_computed`` back to the
        positions whose token is now known (the last appended token's KV is computed next step)."""
        req.spec_counts[0] += 1
        req.spec_counts[1] += len(out.spec_ids) - 1
        req.spec_counts[2] += num_drafts
        for j, tok in enumerate(out.spec_ids):
            if req.meta is not None:
                req.record_meta(False, tok, out.spec_outs[j] if j < len(out.spec_outs) else RowOut())
            req.output_ids.append(tok)
            check_finish(req, tokenizer)
            if req.finish is not None:
                break
        req.num_computed = req.seq_len - 1

