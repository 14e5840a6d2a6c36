"""One request's state inside the scheduler."""

from __future__ import annotations

from typing import Optional

from treadle.runtime.messages import FinishReason, SamplingSpec, TokenizedReq

DETOKENIZE_CONTEXT = 5  # trailing prompt tokens sent with the first output, for correct spacing


class Req:
    def __init__(self, tr: TokenizedReq, max_new_tokens: int, eos_ids: set[int]) -> None:
        self.rid = tr.rid
        self.tr = tr
        self.sampling = tr.sampling
        self.input_ids = tr.input_ids
        self.output_ids: list[int] = []
        self.max_new_tokens = max_new_tokens
        self.stop_ids = set() if self.sampling.ignore_eos else eos_ids | set(self.sampling.stop_token_ids or ())
        self.stop_strs = self.sampling.stop_strs()
        self.slot: Optional[int] = None
        self.pages: list[int] = []
        self.num_computed = 0  # tokens whose KV is in the cache
        self.cached_tokens = 0
        self.finish: Optional[FinishReason] = None
        self.sent = 0  # output ids already emitted to the detokenizer

    @property
    def seq_len(self) -> int:
        return len(self.input_ids) + len(self.output_ids)

    def all_ids(self) -> list[int]:
        return self.input_ids + self.output_ids

    def locs(self, start: int, end: int, page_size: int) -> list[int]:
        """KV-cache token locations of positions ``start .. end-1``."""
        return [self.pages[p // page_size] * page_size + p % page_size for p in range(start, end)]

    def sampling_spec(self, random_seed: int) -> SamplingSpec:
        s = self.sampling
        greedy = s.temperature < 1e-6
        return SamplingSpec(
            temperature=0.0 if greedy else s.temperature, top_p=s.top_p, top_k=1 if greedy else s.top_k,
            min_p=s.min_p, seed=s.sampling_seed,
        )

    def context_ids(self) -> list[int]:
        return self.input_ids[-DETOKENIZE_CONTEXT:]
