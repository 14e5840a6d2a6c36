"""Per-request checks that need the tokenizer or the model's limits (API.md section 4.3)."""

from __future__ import annotations

from treadle.runtime.messages import GenerateReq
from treadle.runtime.server_args import ServerArgs


def check_input_ids(ids: list[int], vocab: int) -> None:
    if not ids:
        raise ValueError("input_ids cannot be empty.")
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0 or t >= vocab:
            raise ValueError(f"input_ids contains {t!r}, which is outside the vocabulary [0, {vocab}).")


def check_lengths(req: GenerateReq, ids: list[int], context_len: int, args: ServerArgs) -> list[int]:
    """Reject (or, with ``allow_auto_truncate``, truncate) inputs that cannot fit the context."""
    if len(ids) >= context_len:
        if not args.allow_auto_truncate:
            raise ValueError(
                f"The input ({len(ids)} tokens) is longer than the model's context length ({context_len} tokens)."
            )
        ids = ids[: context_len - 1]
    max_new = req.sampling.max_new_tokens
    if req.max_new_tokens_set and max_new is not None and len(ids) + max_new > context_len:
        if not args.allow_auto_truncate:
            raise ValueError(
                f"Requested token count exceeds the model's maximum context length of {context_len} tokens. "
                f"You requested a total of {len(ids) + max_new} tokens: {len(ids)} tokens from the input "
                f"messages and {max_new} tokens for the completion. Please reduce the number of tokens in "
                f"the input messages or the completion to fit within the limit."
            )
        req.sampling.max_new_tokens = context_len - len(ids)
    return ids


def check_logprob_args(req: GenerateReq, prompt_len: int, vocab: int) -> None:
    if not req.return_logprob:
        return
    if isinstance(req.logprob_start_len, bool) or not isinstance(req.logprob_start_len, int):
        raise ValueError(f"logprob_start_len must be an int, got {req.logprob_start_len!r}.")
    # a session turn's start counts its whole context, which only the scheduler knows (it checks it there)
    if req.logprob_start_len > prompt_len and req.session is None:
        raise ValueError(
            f"logprob_start_len ({req.logprob_start_len}) is larger than the prompt length ({prompt_len})."
        )
    if req.logprob_start_len < -1:
        raise ValueError(f"logprob_start_len must be -1 (output only) or at least 0, got {req.logprob_start_len}.")
    if isinstance(req.top_logprobs_num, bool) or not isinstance(req.top_logprobs_num, int) or not 0 <= req.top_logprobs_num <= vocab:
        raise ValueError(f"top_logprobs_num must be an int in [0, {vocab}], got {req.top_logprobs_num!r}.")
    for t in req.token_ids_logprob or ():
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
            raise ValueError(f"token_ids_logprob contains {t!r}, which is outside the vocabulary [0, {vocab}).")


def check_embed_length(ids: list[int], limit: int, args: ServerArgs) -> list[int]:
    """An embedding input may use every position; longer ones are an error unless
    ``allow_auto_truncate`` (then the start is kept, as sentence-transformers does)."""
    if len(ids) <= limit:
        return ids
    if args.allow_auto_truncate:
        return ids[:limit]
    raise ValueError(f"The input ({len(ids)} tokens) is longer than the embedding model's limit of {limit} tokens. "
                     f"Shorten it or start the engine with allow_auto_truncate=True.")


def check_token_only(req: GenerateReq) -> None:
    """An engine started with ``skip_tokenizer_init=True`` has no tokenizer: ids in, ids out. What
    needs text is refused, as SGLang's engine refuses it."""
    if req.input_ids is None:
        raise ValueError("The engine initialized with skip_tokenizer_init=True cannot accept text prompts. "
                         "Please provide input_ids or re-initialize the engine with skip_tokenizer_init=False.")
    s = req.sampling
    if s.stop_strs():
        raise ValueError("stop strings need a tokenizer: the engine was started with skip_tokenizer_init=True "
                         "(use stop_token_ids).")
    for name in ("json_schema", "regex", "ebnf"):
        if getattr(s, name) is not None:
            raise ValueError(f"{name} needs a tokenizer (grammars are compiled against the vocabulary's text): "
                             "the engine was started with skip_tokenizer_init=True.")
    if req.image_data or req.video_data:
        raise ValueError("image_data and video_data need the model's processor: the engine was started with "
                         "skip_tokenizer_init=True.")

