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
