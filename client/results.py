"""Result shapes: per-request state in the client, result dicts, and the batch result type."""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import numpy as np

from treadle.runtime.messages import MetaDelta, StrOut

_OUTPUT_LISTS = ("output_token_logprobs", "output_top_logprobs", "output_token_ids_logprobs")


class BatchResult(list):
    """A list of result dicts that also answers column access (API.md part A).

    ``res[0]["text"]`` and ``res["text"][0]`` both work; ``res["embedding"]`` lists the vectors.
    """

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        if isinstance(key, str):
            return [item[key] for item in self]
        if isinstance(key, slice):
            return BatchResult(super().__getitem__(key))
        return super().__getitem__(key)


class ReqState:
    """Accumulates one request's outputs; ``deliver`` hands items to whoever waits on it."""

    def __init__(self, rid: str, created: float, deliver: Callable[[Any], None], index: Optional[int] = None,
                 want: tuple[bool, bool, bool, bool] = (False, False, False, False),
                 weight_version: str = "default", with_text: bool = True,
                 version_of: Optional[Callable[[], str]] = None) -> None:
        self.rid = rid
        self.with_text = with_text  # False with skip_tokenizer_init: results carry output_ids only, as SGLang's
        self.weight_version = weight_version  # the engine's ``weight_version``, echoed in meta_info
        # read again at the first output: a request queued while the weights changed runs on the new ones
        self.version_of = version_of
        self.created = created
        self.deliver = deliver
        self.index = index
        self.text = ""
        self.output_ids: list[int] = []
        self.finished = False
        # which meta keys the request asked for: logprobs, top logprobs, token-id logprobs, hidden states
        self.keys = _wanted_keys(*want)
        self.lists: dict[str, list[Any]] = {k: [] for k in self.keys}
        self.mm_tokens: dict[str, int] = {}  # image / video prompt tokens (sent with the first output)
        self.time_stats: dict[str, float] = {}  # enable_metrics: sent once, after the prefill

    def update(self, out: StrOut, incremental: bool, stream: bool) -> Optional[dict[str, Any]]:
        """Fold one output in; return the chunk to deliver (every update when streaming, else the last)."""
        self.finished = out.finish is not None
        if self.version_of is not None:
            self.weight_version, self.version_of = self.version_of(), None
        if out.embedding:
            return {"embedding": np.frombuffer(out.embedding, dtype=np.float32).tolist(), "meta_info": {
                "id": self.rid, "finish_reason": out.finish.to_json() if out.finish else None,
                "prompt_tokens": out.prompt_tokens, "weight_version": self.weight_version,
                "num_retractions": out.num_retractions, "e2e_latency": time.time() - self.created}}
        self.text += out.text
        self.output_ids.extend(out.new_ids)
        new = self._fold_meta(out.meta)
        self.time_stats.update(out.time_stats)
        if not stream and not self.finished:
            return None
        meta: dict[str, Any] = {
            "id": self.rid,
            "finish_reason": out.finish.to_json() if out.finish is not None else None,
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens,
            "cached_tokens": out.cached_tokens,
            "reasoning_tokens": 0,  # no reasoning parser: nothing is a reasoning segment
            "weight_version": self.weight_version,
            "num_retractions": out.num_retractions,
        }
        meta.update(self.time_stats)
        meta.update(out.spec_stats)  # speculative decoding's counters (current totals)
        if out.mm_tokens:
            self.mm_tokens = out.mm_tokens
        for modality, count in self.mm_tokens.items():
            meta[f"{modality}_tokens"] = count
        for k in self.keys:
            meta[k] = new[k] if (stream and incremental and k in _OUTPUT_LISTS) else list(self.lists[k])
        if "output_token_logprobs" in self.keys:
            meta["output_token_logprobs_length"] = len(self.lists["output_token_logprobs"])
        now = time.time()
        if self.finished:
            meta["e2e_latency"] = now - self.created
        meta["response_sent_to_client_ts"] = now
        if stream and incremental:
            chunk: dict[str, Any] = {"text": out.text, "output_ids": list(out.new_ids), "meta_info": meta}
        else:
            chunk = {"text": self.text, "output_ids": list(self.output_ids), "meta_info": meta}
        if not self.with_text:
            del chunk["text"]
        if self.index is not None and stream:
            chunk["index"] = self.index
        return chunk

    def _fold_meta(self, delta: Optional[MetaDelta]) -> dict[str, list[Any]]:
        """Append a delta's entries as SGLang's ``(logprob, token_id, text)`` tuples; return the new ones."""
        new: dict[str, list[Any]] = {k: [] for k in self.keys}
        if delta is None:
            return new
        for k in self.keys:
            entries = getattr(delta, k)
            if k != "hidden_states":
                entries = [_tuples(e) for e in entries]
            new[k] = entries
            self.lists[k].extend(entries)
        return new


def _tuples(entry: Any) -> Any:
    """``[lp, id]`` -> ``(lp, id, None)``; a list of pairs -> a list of tuples; None stays None."""
    if entry is None:
        return None
    if entry and isinstance(entry[0], list):
        return [(lp, t, None) for lp, t in entry]
    if not entry:
        return []
    return (entry[0], entry[1], None)


def _wanted_keys(logprob: bool, top: bool, token_ids: bool, hidden: bool) -> tuple[str, ...]:
    keys: list[str] = []
    if logprob:
        keys += ["input_token_logprobs", "output_token_logprobs"]
        if top:
            keys += ["input_top_logprobs", "output_top_logprobs"]
        if token_ids:
            keys += ["input_token_ids_logprobs", "output_token_ids_logprobs"]
    if hidden:
        keys.append("hidden_states")
    return tuple(keys)
