"""The engine's logprob lists -> OpenAI's two logprob shapes.

The engine gives ``(logprob, token_id, text)`` triples (``meta_info["output_token_logprobs"]``)
and, per position, a list of such triples for the top alternatives; the token texts come from
the server's tokenizer. Completions use the legacy shape (``tokens``, ``token_logprobs``,
``top_logprobs`` as dicts, ``text_offset``); chat uses ``content: [{token, logprob, bytes,
top_logprobs}]``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

TokenText = Callable[[int], str]


def _text(entry: Any, token_text: TokenText) -> str:
    return entry[2] if len(entry) > 2 and entry[2] is not None else token_text(int(entry[1]))


def completion_logprobs(tokens: list[Any], tops: Optional[list[Any]], token_text: TokenText,
                        offset: int = 0) -> dict[str, Any]:
    """Legacy completions logprobs; ``offset`` is where the first token's text starts in the
    choice's text (after an echoed prompt, or after earlier stream chunks)."""
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for i, entry in enumerate(tokens):
        text = _text(entry, token_text)
        out["tokens"].append(text)
        out["token_logprobs"].append(entry[0])
        top = tops[i] if tops is not None and i < len(tops) else None
        out["top_logprobs"].append(None if top is None else {_text(t, token_text): t[0] for t in top})
        out["text_offset"].append(offset)
        offset += len(text)
    if tops is None:
        out["top_logprobs"] = None
    return out


def merge_completion_logprobs(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """An echoed prompt's logprobs followed by the output's."""
    return {k: (a[k] or [None] * len(a["tokens"])) + (b[k] or [None] * len(b["tokens"]))
            if k == "top_logprobs" else a[k] + b[k] for k in a}


def chat_logprobs(tokens: list[Any], tops: Optional[list[Any]], token_text: TokenText) -> dict[str, Any]:
    def item(entry: Any) -> dict[str, Any]:
        text = _text(entry, token_text)
        return {"token": text, "logprob": entry[0], "bytes": list(text.encode("utf-8"))}

    content = []
    for i, entry in enumerate(tokens):
        top = tops[i] if tops is not None and i < len(tops) and tops[i] is not None else []
        content.append({**item(entry), "top_logprobs": [item(t) for t in top]})
    return {"content": content, "refusal": None}
