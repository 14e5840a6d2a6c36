"""Per-request logprob and hidden-state lists, filled from the worker's ``RowOut`` extras.

Entries are kept in SGLang's order and shape (API.md section 6.4); ``delta()`` hands the
detokenizer only what is new since the last emission.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from treadle.runtime.messages import MetaDelta, RowOut

_KEYS = MetaDelta.__struct_fields__


class OutputMeta:
    def __init__(self, top_k: int, token_ids: Optional[list[int]], hidden_size: int) -> None:
        self.top_k = top_k
        self.token_ids = token_ids or []
        self.hidden_size = hidden_size
        self.lists: dict[str, list[Any]] = {k: [] for k in _KEYS}
        self.sent: dict[str, int] = {k: 0 for k in _KEYS}

    def add_input(self, input_ids: list[int], start: int, extra: RowOut) -> None:
        """Input logprobs for prompt positions ``start ..``: the first has no predictor (None)."""
        if start >= len(input_ids):
            return
        L = self.lists
        L["input_token_logprobs"] += [[None, input_ids[start]]] + [
            [lp, input_ids[start + 1 + i]] for i, lp in enumerate(extra.input_logprobs)]
        if self.top_k:
            L["input_top_logprobs"] += [None] + [_pairs(lps, ids) for ids, lps in
                                                 zip(extra.input_top_ids, extra.input_top_logprobs)]
        if self.token_ids:
            L["input_token_ids_logprobs"] += [None] + [_pairs(lps, self.token_ids) for lps in extra.input_ids_logprobs]

    def add_output(self, token: int, extra: RowOut) -> None:
        L = self.lists
        L["output_token_logprobs"].append([extra.logprob, token])
        if self.top_k:
            L["output_top_logprobs"].append(_pairs(extra.top_logprobs, extra.top_ids))
        if self.token_ids:
            L["output_token_ids_logprobs"].append(_pairs(extra.ids_logprobs, self.token_ids))

    def add_hidden(self, extra: RowOut, prefill: bool) -> None:
        """A prefill contributes one element (all its positions), each decode step one vector."""
        h = np.frombuffer(extra.hidden, dtype=np.float32).reshape(-1, self.hidden_size)
        self.lists["hidden_states"].append(h.tolist() if prefill else h[-1].tolist())

    def delta(self) -> Optional[MetaDelta]:
        new = {k: v[self.sent[k]:] for k, v in self.lists.items() if len(v) > self.sent[k]}
        for k, v in self.lists.items():
            self.sent[k] = len(v)
        return MetaDelta(**new) if new else None


def _pairs(logprobs: list[float], ids: list[int]) -> list[list[Any]]:
    return [[lp, t] for lp, t in zip(logprobs, ids)]
