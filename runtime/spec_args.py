"""Speculative decoding's arguments (SGLang's names), checked at construction and resolved once.

``NGRAM`` drafts from the request's own prompt and output (no draft model); ``STANDALONE`` runs a
smaller model with the same tokenizer (``speculative_draft_model_path``) in the worker beside the
target; ``EAGLE`` / ``EAGLE3`` run a one-layer draft head that reads the target's hidden states
(``gpu_worker/spec_eagle.py``). Drafts are verified in one target forward, as a chain or, with
``speculative_eagle_topk > 1`` (NGRAM, EAGLE, EAGLE3), as a tree of ``num_draft_tokens - 1`` nodes
(docs/speculative.md). Steps with tree rows run attention on the torch-native backend (the
Triton kernels are causal only).

Counts as SGLang defines them: ``speculative_num_draft_tokens`` is the tokens one verify forward
runs, the last known token included, so a chain proposes ``num_draft_tokens - 1`` drafts;
``speculative_num_steps`` is the draft model's autoregressive steps (its drafts).
"""

from __future__ import annotations

from typing import Any, Optional

SPEC_ALGORITHMS = (None, "NGRAM", "STANDALONE", "EAGLE", "EAGLE3")
BUILT = SPEC_ALGORITHMS
DRAFT_MODEL = ("STANDALONE", "EAGLE", "EAGLE3")  # the algorithms that read speculative_draft_model_path
NGRAM_DRAFT_TOKENS = 8  # tokens per verify when not given: 7 drafts (SGLang's ngram default is 12, tuned for GPUs)
STANDALONE_STEPS = 3  # SGLang's default for a draft model (num_steps 3, topk 1, num_draft_tokens 4)
EAGLE_TREE_NODES = 8  # draft nodes of an EAGLE tree when num_draft_tokens is not given (topk > 1)


def _pos_int(name: str, v: Any, optional: bool = True) -> None:
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if optional else ''}, got {v!r}.")


def check_spec_args(a: Any) -> None:
    """``ValueError`` naming the field for a bad value (valid settings not built yet, such as a draft
    model with ``pp_size > 1``, are refused later by ``ServerArgs.check_supported``)."""
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
    if alg in DRAFT_MODEL and not (isinstance(path, str) and path):
        raise ValueError(f"speculative_draft_model_path is required with speculative_algorithm={alg!r}.")
    topk, steps, tokens = a.speculative_eagle_topk, a.speculative_num_steps, a.speculative_num_draft_tokens
    if alg in ("EAGLE", "EAGLE3") and topk and topk > 1 and steps and tokens and tokens - 1 > topk * steps:
        raise ValueError(f"speculative_num_draft_tokens={tokens} exceeds the {topk * steps} + 1 tokens an EAGLE tree of "
                         f"speculative_eagle_topk={topk} and speculative_num_steps={steps} can draft.")
    if alg in (None, "NGRAM") and path is not None:
        raise ValueError(f"speculative_draft_model_path is not read with speculative_algorithm={alg!r}.")


def spec_refusals(a: Any) -> list[str]:
    """``"name=value (why)"`` for the speculative settings not built yet (``check_supported``)."""
    out = []
    if a.speculative_algorithm == "STANDALONE" and a.speculative_eagle_topk not in (None, 1):
        out.append(f"speculative_eagle_topk={a.speculative_eagle_topk!r} (STANDALONE drafts chains only)")
    if a.speculative_algorithm in DRAFT_MODEL and a.pp_size > 1:
        out.append(f"speculative_algorithm={a.speculative_algorithm!r} with pp_size={a.pp_size} (draft models and "
                   "EAGLE heads run beside a whole target, not a pipeline stage)")
    return out


def resolve_spec_args(a: Any) -> None:
    """Fill the counts SGLang leaves to ``None``: drafts per verify follow the algorithm's default.
    Speculation plans a request's next verify once its last one is back, so overlap scheduling is
    off (as SGLang's older speculative workers)."""
    if a.speculative_algorithm is None:
        return
    a.disable_overlap_schedule = True
    topk = a.speculative_eagle_topk = a.speculative_eagle_topk or 1
    if a.speculative_algorithm == "NGRAM":
        a.speculative_num_draft_tokens = a.speculative_num_draft_tokens or NGRAM_DRAFT_TOKENS
        a.speculative_num_steps = a.speculative_num_draft_tokens - 1
    elif topk > 1:  # an EAGLE tree: num_steps deep, num_draft_tokens - 1 of its best nodes verified
        a.speculative_num_steps = a.speculative_num_steps or STANDALONE_STEPS
        a.speculative_num_draft_tokens = a.speculative_num_draft_tokens or min(
            EAGLE_TREE_NODES, topk * a.speculative_num_steps) + 1
    else:
        a.speculative_num_steps = a.speculative_num_steps or (
            a.speculative_num_draft_tokens - 1 if a.speculative_num_draft_tokens else STANDALONE_STEPS)
        a.speculative_num_draft_tokens = a.speculative_num_steps + 1


def draft_model_dir(a: Any) -> Optional[str]:
    """The draft model's HF directory (STANDALONE, EAGLE, EAGLE3), resolved as ``model_path`` is
    (aliases, hub ids)."""
    if a.speculative_algorithm not in DRAFT_MODEL:
        return None
    from treadle.runtime.model_files import resolve_model_files

    return resolve_model_files(a.speculative_draft_model_path, download_dir=a.download_dir).model_dir
