"""SGLang's scoring calls on the ``Engine``: ``rerank`` (cross-encoder pairs) and ``score`` (label
token probabilities after query + item), built on ``encode`` and ``generate``.

``score`` on a generative model asks, for each prompt (query + item, or item + query), the
logprobs of ``label_token_ids`` at the position after the prompt: one prefill with one greedy
output token, whose ``output_token_ids_logprobs`` are of the raw logits there (SGLang runs it with
``max_new_tokens=0``; Treadle's prefill-only generate reports no output position, and the one
sampled token costs no extra forward). ``apply_softmax`` normalizes over the labels; without it
each is its probability over the whole vocabulary. On a classification model ``score`` returns
its class scores (``label_token_ids`` ignored), as SGLang's.

``rerank`` tokenizes each ``[query, document]`` pair in this process as a pair (the tokenizer's
own ``[CLS] q [SEP] d [SEP]``) and encodes the ids; each result's ``embedding`` is the pair's
score (a float for a one-label head, else the list).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Union

from treadle.runtime.model_check import ARCHITECTURES, architecture

Query = Union[str, list[int], None]
Items = Union[str, list[str], list[list[int]], None]


@dataclass(frozen=True)
class ScoreResult:
    """``score``'s answer (SGLang's shape): one list per item, in ``label_token_ids`` order (for a
    classification model: its class scores), and the prompt tokens processed."""

    scores: list[list[float]]
    prompt_tokens: int


def _is_ids(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def score_prompts(query: Query, items: Items, item_first: bool) -> tuple[str, list[Any]]:
    """``("prompt" | "input_ids", the per-item inputs)``: text joined as text, ids as ids."""
    if isinstance(query, str) and (isinstance(items, str) or (
            isinstance(items, list) and all(isinstance(i, str) for i in items))):
        items_list = [items] if isinstance(items, str) else items
        return "prompt", [f"{i}{query}" if item_first else f"{query}{i}" for i in items_list]
    if _is_ids(query) and isinstance(items, list) and items and all(_is_ids(i) for i in items):
        return "input_ids", [i + query if item_first else query + i for i in items]
    raise ValueError("query and items must both be text (a str and a str or list of str) or both token ids "
                     "(a list of int and a list of lists of int).")


def check_labels(label_token_ids: Any, vocab_size: Optional[int]) -> list[int]:
    if label_token_ids is None:
        raise ValueError("label_token_ids must be provided")
    if not _is_ids(label_token_ids) or not label_token_ids:
        raise ValueError(f"label_token_ids must be a non-empty list of token ids, got {label_token_ids!r}.")
    for t in label_token_ids:
        if t < 0 or (vocab_size is not None and t >= vocab_size):
            raise ValueError(f"Token ID {t} is out of vocabulary (vocab size: {vocab_size})")
    return list(label_token_ids)


def label_scores(meta: dict[str, Any], labels: list[int], apply_softmax: bool) -> list[float]:
    """The labels' scores from one result's ``output_token_ids_logprobs`` (its first position)."""
    got = {tid: lp for lp, tid, *_ in meta["output_token_ids_logprobs"][0]}
    lps = [got.get(t, -math.inf) for t in labels]
    if apply_softmax:
        top = max(lps)
        exps = [math.exp(lp - top) for lp in lps]
        return [e / sum(exps) for e in exps]
    return [math.exp(lp) if lp != -math.inf else 0.0 for lp in lps]


def class_scores(embedding: Any, apply_softmax: bool) -> list[float]:
    vec = list(embedding) if isinstance(embedding, list) else [embedding]
    if not apply_softmax:
        return vec
    top = max(vec)
    exps = [math.exp(v - top) for v in vec]
    return [e / sum(exps) for e in exps]


class ScoringCalls:
    """``rerank`` / ``score`` (and async twins) of the ``Engine``, which supplies ``generate``,
    ``encode``, their async twins, ``server_args``, ``tokenizer_manager`` and ``_files``."""

    def _head_module(self) -> Optional[str]:
        """The gpu_worker module of the served architecture (``classification``, ``cross_encoder``...)."""
        import json
        import os

        with open(os.path.join(self._files.model_dir, "config.json")) as f:
            arch = architecture(json.load(f))
        return ARCHITECTURES.get(arch) if arch else None

    # ------------------------------------------------------------------ rerank
    def _rerank_ids(self, prompt: Any) -> list[list[int]]:
        if (not isinstance(prompt, list) or not prompt or not all(
                isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(s, str) for s in p) for p in prompt)):
            raise TypeError("prompt must be a non-empty list of [query, document] pairs of strings.")
        if self._head_module() != "cross_encoder":
            raise ValueError("rerank() needs a cross-encoder model (BertForSequenceClassification or "
                             "XLMRobertaForSequenceClassification).")
        tok = self.tokenizer_manager.tokenizer
        if tok is None:
            raise ValueError("rerank() tokenizes its pairs: it needs a tokenizer (skip_tokenizer_init is set).")
        return [list(tok(q, d)["input_ids"]) for q, d in prompt]

    @staticmethod
    def _pair_scores(res: Any) -> Any:
        for r in res:
            if len(r["embedding"]) == 1:
                r["embedding"] = r["embedding"][0]
        return res

    def rerank(self, prompt: list[list[str]]) -> Any:
        """Scores of ``[query, document]`` pairs: a list of ``{"embedding": score, "meta_info": ...}``."""
        return self._pair_scores(self.encode(self._rerank_ids(prompt)))

    async def async_rerank(self, prompt: list[list[str]]) -> Any:
        return self._pair_scores(await self.async_encode(self._rerank_ids(prompt)))

    # ------------------------------------------------------------------ score
    def _score_call(self, query: Query, items: Items, label_token_ids: Any, apply_softmax: bool,
                    item_first: bool) -> Optional[tuple[str, dict[str, Any], Optional[list[int]]]]:
        """``(method, kwargs, labels)`` of the underlying call; None when there is nothing to score."""
        if items is None:
            raise ValueError("items must be provided")
        if not isinstance(apply_softmax, bool) or not isinstance(item_first, bool):
            raise TypeError("apply_softmax and item_first must be bools.")
        if isinstance(items, list) and not items:
            return None
        key, prompts = score_prompts(query, items, item_first)
        if self.server_args.is_embedding:
            if self._head_module() not in ("classification", "cross_encoder"):
                raise ValueError("score() needs a generation model or a classification model; this one embeds.")
            return "encode", {"prompt": prompts}, None
        vocab = len(self.tokenizer_manager.tokenizer) if self.tokenizer_manager.tokenizer is not None else None
        labels = check_labels(label_token_ids, vocab)
        kwargs = {key: prompts, "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
                  "return_logprob": True, "token_ids_logprob": labels}
        return "generate", kwargs, labels

    @staticmethod
    def _score_result(res: Any, labels: Optional[list[int]], apply_softmax: bool) -> ScoreResult:
        tokens = sum(r["meta_info"].get("prompt_tokens", 0) for r in res)
        if labels is None:
            return ScoreResult([class_scores(r["embedding"], apply_softmax) for r in res], tokens)
        return ScoreResult([label_scores(r["meta_info"], labels, apply_softmax) for r in res], tokens)

    def score(self, query: Query = None, items: Items = None, label_token_ids: Optional[list[int]] = None,
              apply_softmax: bool = False, item_first: bool = False) -> ScoreResult:
        """SGLang's ``score``: for each item, the probabilities of ``label_token_ids`` as the next
        token after query + item (item + query with ``item_first``); ``apply_softmax`` normalizes
        them over the labels."""
        call = self._score_call(query, items, label_token_ids, apply_softmax, item_first)
        if call is None:
            return ScoreResult([], 0)
        method, kwargs, labels = call
        return self._score_result(getattr(self, method)(**kwargs), labels, apply_softmax)

    async def async_score(self, query: Query = None, items: Items = None, label_token_ids: Optional[list[int]] = None,
                          apply_softmax: bool = False, item_first: bool = False) -> ScoreResult:
        call = self._score_call(query, items, label_token_ids, apply_softmax, item_first)
        if call is None:
            return ScoreResult([], 0)
        method, kwargs, labels = call
        return self._score_result(await getattr(self, "async_" + method)(**kwargs), labels, apply_softmax)
