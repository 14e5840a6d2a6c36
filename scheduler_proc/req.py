"""One request's state inside the scheduler."""

from __future__ import annotations

from typing import Any, Optional

from treadle.runtime.messages import (
    FinishReason, MmChunk, MmItem, RowOut, SamplingSpec, TokenizedReq, TokenOut, radix_key_ids,
)
from treadle.scheduler_proc.output_meta import OutputMeta

DETOKENIZE_CONTEXT = 5  # trailing prompt tokens sent with the first output, for correct spacing


class Req:
    def __init__(self, tokenized: TokenizedReq, max_new_tokens: int, eos_ids: set[int], hidden_size: int = 0) -> None:
        self.rid = tokenized.rid
        self.tokenized = tokenized  # the request as the tokenizer sent it
        self.sampling = tokenized.sampling
        self.input_ids = tokenized.input_ids
        self.output_ids: list[int] = []
        self.max_new_tokens = max_new_tokens
        self.stop_ids = set() if self.sampling.ignore_eos else eos_ids | set(self.sampling.stop_token_ids or ())
        self.stop_strs = self.sampling.stop_strs()
        self.slot: Optional[int] = None
        self.lora_slot = -1  # the device slot of its LoRA adapter while it runs (-1: base model)
        self.pages: list[int] = []  # KV pages of positions 0.. in order; the first `shared_pages` belong to the cache
        self.shared_pages = 0
        self.cache_node: Any = None  # locked radix node of the matched prefix
        self.num_computed = 0  # positions whose KV is computed (or being computed by a step in flight)
        self.samples_in_flight = 0  # tokens sampled by steps in flight, not known here yet (overlap scheduling)
        self.steps_in_flight = 0  # steps in flight that contain this request (its KV and slot stay until 0)
        self.prefill_end = 0  # positions to compute before the next sample (set at admission)
        self.cached_tokens = 0
        self.num_retractions = 0
        self.arrival = 0
        # monotonic seconds: queued, first admitted into a step, that step planned, first token back (0: not yet)
        self.t_queued = self.t_admitted = self.t_launched = self.t_prefilled = 0.0
        self.time_stats_sent = False
        self.finish: Optional[FinishReason] = None
        self.sent = 0  # output ids already emitted to the detokenizer
        self.finish_sent = False  # the finished output went out
        self.eos_ids = eos_ids
        wants_meta = tokenized.return_logprob or tokenized.return_hidden_states
        self.meta = (OutputMeta(tokenized.top_logprobs_num, tokenized.token_ids_logprob, hidden_size)
                     if wants_meta else None)
        self.input_logprobs_done = not self.wants_input_logprobs
        self.hidden_prefill_done = False
        self.grammar: Any = None  # grammar.ReqGrammar of a json_schema / regex / ebnf request
        self.embedding = b""
        self.mm_items: list[MmItem] = tokenized.mm_items  # images / video frames (a session turn: its context's too)
        self.mm_sent: set[int] = set()  # items whose pixels the worker got for the current slot
        self.spec_counts: Optional[list[int]] = None  # speculative decoding: [verifies, accepted, proposed]

    @property
    def seq_len(self) -> int:
        return len(self.input_ids) + len(self.output_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens of the sequence, the ones still being sampled included."""
        return self.seq_len + self.samples_in_flight

    def all_ids(self) -> list[int]:
        return self.input_ids + self.output_ids

    @property
    def wants_input_logprobs(self) -> bool:
        """Logprobs of prompt positions from ``logprob_start_len`` on were asked for."""
        return self.tokenized.return_logprob and self.tokenized.logprob_start_len >= 0

    @property
    def cache_namespace(self) -> str:
        """The radix-cache tree this request shares prefixes in: one per (LoRA adapter, cache_salt)."""
        tr = self.tokenized
        return (tr.lora_name or "") if tr.cache_salt is None else f"{tr.lora_name or ''}\x00salt:{tr.cache_salt}"

    def key_ids(self) -> list[int]:
        """The radix-cache key of the sequence: ``all_ids()`` with each image's placeholder positions
        set to ``-1 - digest``, so only the same image (and text around it) shares cached KV."""
        return radix_key_ids(self.all_ids(), self.mm_items)

    def mm_token_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for it in self.mm_items:
            counts[it.modality] = counts.get(it.modality, 0) + it.num_tokens
        return counts

    def mm_chunks(self, start: int, end: int) -> list[MmChunk]:
        """The items overlapping positions ``[start, end)``; pixels go with an item's first chunk."""
        out = []
        for i, it in enumerate(self.mm_items):
            if it.offset < end and start < it.offset + it.num_tokens:
                first = i not in self.mm_sent
                self.mm_sent.add(i)
                out.append(MmChunk(i, it.offset, it.num_tokens, it.pixels if first else b"",
                                   it.shape if first else []))
        return out

    def last_id(self) -> int:
        """The last known token (without copying the sequence, as ``all_ids()[-1]`` would)."""
        return self.output_ids[-1] if self.output_ids else self.input_ids[-1]

    @property
    def prefilling(self) -> bool:
        return self.num_computed < self.prefill_end

    def remaining_tokens(self) -> int:
        return max(0, self.max_new_tokens - len(self.output_ids) - self.samples_in_flight)

    def ends_only_by_length(self) -> bool:
        """Whether it surely makes all of ``max_new_tokens`` (``ignore_eos``, no stop ids or strings, no
        grammar): its future KV need is known exactly."""
        return self.sampling.ignore_eos and not self.stop_ids and not self.stop_strs and self.grammar is None

    def locs(self, start: int, end: int, page_size: int) -> list[int]:
        """KV-cache token locations of positions ``start .. end-1``."""
        return [self.pages[p // page_size] * page_size + p % page_size for p in range(start, end)]

    def sampling_spec(self, vocab_size: int) -> SamplingSpec:
        """The worker's view of this request; stop ids beyond the vocabulary never occur, so they are
        not sent (the usage guide's Llama-3 ids on a smaller model are legal, as in SGLang)."""
        s, tr = self.sampling, self.tokenized
        greedy = s.temperature < 1e-6
        bias = {int(k): float(v) for k, v in s.logit_bias.items()} if s.logit_bias else None
        return SamplingSpec(
            temperature=0.0 if greedy else s.temperature, top_p=s.top_p, top_k=1 if greedy else s.top_k,
            min_p=s.min_p, seed=s.sampling_seed, frequency_penalty=s.frequency_penalty,
            presence_penalty=s.presence_penalty, repetition_penalty=s.repetition_penalty,
            min_new_tokens=s.min_new_tokens,
            stop_ids=sorted(t for t in self.eos_ids | set(s.stop_token_ids or ()) if t < vocab_size)
            if s.min_new_tokens else [],
            logit_bias=bias, custom_processor=tr.custom_logit_processor, custom_state=tr.custom_state,
            custom_params=s.custom_params, logprobs=tr.return_logprob, top_logprobs_num=tr.top_logprobs_num,
            token_ids_logprob=tr.token_ids_logprob, return_hidden=tr.return_hidden_states, embed=tr.embed,
        )

    def spec_stats(self) -> dict[str, float]:
        """SGLang's speculative ``meta_info`` keys: verify forwards (a decode step without drafts counts
        as a verify of none), tokens per verify, drafts accepted and proposed."""
        verifies, accepted, proposed = self.spec_counts
        return {"spec_verify_ct": verifies, "spec_accept_length": (verifies + accepted) / verifies if verifies else 0.0,
                "spec_num_correct_drafts": accepted, "spec_num_proposed_drafts": proposed}

    def context_ids(self) -> list[int]:
        return self.input_ids[-DETOKENIZE_CONTEXT:]

    def record_meta(self, prefill: bool, tok: Optional[int], extra: RowOut) -> None:
        """Keep a step's logprobs / hidden states for the output (``meta`` exists: the request asked)."""
        tr = self.tokenized
        if prefill and not self.input_logprobs_done and self.wants_input_logprobs:
            self.meta.add_input(self.input_ids, tr.logprob_start_len, extra)
            self.input_logprobs_done = True
        if tr.return_logprob and tok is not None:
            self.meta.add_output(tok, extra)
        if tr.return_hidden_states and extra.hidden:
            self.meta.add_hidden(extra, prefill and not self.hidden_prefill_done)
            self.hidden_prefill_done = True

    def time_stats(self) -> dict[str, float]:
        """SGLang's time-stat ``meta_info`` keys (``enable_metrics``), once the prefill is done: seconds
        in the waiting queue, from admission to the step being planned, and from then to the first token."""
        if not self.t_prefilled or self.time_stats_sent:
            return {}
        self.time_stats_sent = True
        return {"queue_time": self.t_admitted - self.t_queued, "prefill_launch_delay": self.t_launched - self.t_admitted,
                "prefill_launch_latency": self.t_prefilled - self.t_launched}

    def token_out(self, metrics: bool = False) -> TokenOut:
        """What the detokenizer gets: the output ids not sent yet (and the finish, if any); marks them sent.
        ``metrics``: add the time stats (once)."""
        s, fin = self.sampling, self.finish
        out = TokenOut(
            rid=self.rid, new_ids=self.output_ids[self.sent:], finish=fin,
            prompt_tokens=len(self.input_ids), completion_tokens=len(self.output_ids),
            cached_tokens=self.cached_tokens, context_ids=self.context_ids() if self.sent == 0 else [],
            skip_special_tokens=s.skip_special_tokens, spaces_between_special_tokens=s.spaces_between_special_tokens,
            trim_stop_str=fin.matched if fin is not None and isinstance(fin.matched, str) and not s.no_stop_trim else None,
            trim_last_token=fin is not None and isinstance(fin.matched, int) and not s.no_stop_trim,
            meta=self.meta.delta() if self.meta is not None else None, embedding=self.embedding,
            mm_tokens=self.mm_token_counts() if self.mm_items and self.sent == 0 else {},
            num_retractions=self.num_retractions, time_stats=self.time_stats() if metrics else {},
            spec_stats=self.spec_stats() if self.spec_counts is not None else {},
        )
        self.sent = len(self.output_ids)
        self.finish_sent = fin is not None
        return out
