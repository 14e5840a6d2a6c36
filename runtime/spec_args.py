"""Speculative decoding's arguments (SGLang's names), checked at construction and resolved once.

``NGRAM`` drafts from the request's own prompt and output (no draft model); ``STANDALONE`` runs a
smaller model with the same tokenizer (``speculative_draft_model_path``) in the worker beside the
target. Both verify a chain of drafts in one target forward (docs/speculative.md). ``EAGLE`` and
``EAGLE3`` (draft heads that read the target's hidden states) are refused: not built yet.

Counts as SGLang defines them: ``speculative_num_draft_tokens`` is the tokens one verify forward
runs, the last known token included, so a chain proposes ``num_draft_tokens - 1`` drafts;
``speculative_num_steps`` is the draft model's autoregressive steps (its drafts).
"""

from __future__ import annotations

from typing import Any, Optional

SPEC_ALGORITHMS = (None, "NGRAM", "STANDALONE", "EAGLE", "EAGLE3")
BUILT = (None, "NGRAM", "STANDALONE")
NGRAM_DRAFT_TOKENS = 8  # tokens per verify when not given: 7 drafts (SGLang's ngram default is 12, tuned for GPUs)
STANDALONE_STEPS = 3  # SGLang's default for a draft model (num_steps 3, topk 1, num_draft_tokens 4)


def _pos_int(name: str, v: Any, optional: bool = True) -> None:
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if optional else ''}, got {v!r}.")


def check_spec_args(a: Any) -> None:
    """``ValueError`` naming the field for a bad value (EAGLE, a valid value, is refused later by
    ``ServerArgs.check_supported``, with the other features not built)."""
    alg = a.speculative_algorithm
    if isinstance(alg, str):
        alg = a.speculative_algorithm = alg.upper()
    if alg not in SPEC_ALGORITHMS:
        raise ValueError(f"speculative_algorithm must be one of {[x for x in SPEC_ALGORITHMS if x]} or None, "
                         f"got {a.speculative_algorithm!r}.")
    for name in ("speculative_num_steps", "speculative_eagle_topk", "speculative_num_draft_tokens"):
        _pos_int(name, getattr(a, name))
    for name in ("speculative_ngram_min_match_window_size", "speculative_ngram_max_match_window_size"):
        _pos_int(name, getattr(a, name), optional=False)
    if a.speculative_ngram_min_match_window_size > a.speculative_ngram_max_match_window_size:
        raise ValueError("speculative_ngram_min_match_window_size must not exceed "
                         "speculative_ngram_max_match_window_size.")
    if a.speculative_num_draft_tokens == 1:
        raise ValueError("speculative_num_draft_tokens must be at least 2 (the last token and one draft).")
    path = a.speculative_draft_model_path
    if alg == "STANDALONE" and not (isinstance(path, str) and path):
        raise ValueError("speculative_draft_model_path is required with speculative_algorithm='STANDALONE'.")
    if alg in (None, "NGRAM") and path is not None:
        raise ValueError(f"speculative_draft_model_path is not read with speculative_algorithm={alg!r}.")


def spec_refusals(a: Any) -> list[str]:
    """``"name=value (why)"`` for the speculative settings not built yet (``check_supported``)."""
    out = []
    if a.speculative_algorithm not in BUILT:
        out.append(f"speculative_algorithm={a.speculative_algorithm!r} (EAGLE draft heads are not built yet: "
                   f"use 'NGRAM' or 'STANDALONE')")
    if a.speculative_eagle_topk not in (None, 1):
        out.append(f"speculative_eagle_topk={a.speculative_eagle_topk!r} (tree drafts are not built yet: chains only)")
    return out


def resolve_spec_args(a: Any) -> None:
    """Fill the counts SGLang leaves to ``None``: drafts per verify follow the algorithm's default.
    Speculation plans a request's next verify once its last one is back, so overlap scheduling is
    off (as SGLang's older speculative workers)."""
    if a.speculative_algorithm is None:
        return
    a.disable_overlap_schedule = True
    a.speculative_eagle_topk = a.speculative_eagle_topk or 1
    if a.speculative_algorithm == "NGRAM":
        a.speculative_num_draft_tokens = a.speculative_num_draft_tokens or NGRAM_DRAFT_TOKENS
        a.speculative_num_steps = a.speculative_num_draft_tokens - 1
    else:
        a.speculative_num_steps = a.speculative_num_steps or (
            a.speculative_num_draft_tokens - 1 if a.speculative_num_draft_tokens else STANDALONE_STEPS)
        a.speculative_num_draft_tokens = a.speculative_num_steps + 1


def draft_model_dir(a: Any) -> Optional[str]:
    """The draft model's HF directory (STANDALONE), resolved as ``model_path`` is (aliases, hub ids)."""
    if a.speculative_algorithm != "STANDALONE":
        return None
    from treadle.runtime.model_files import resolve_model_files

    return resolve_model_files(a.speculative_draft_model_path, download_dir=a.download_dir).model_dir
